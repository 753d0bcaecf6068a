//! Normalisation of numeric columns, fitted on the non-missing train values of each column.
//!
//! Every method is an affine map `(x - shift) * scale` computed in f64 and stored as f32.
//! A missing value (empty cell) becomes 0 *after* normalisation: the train mean for
//! `standard`, the train minimum for `minmax`, and 0 for `none`.

use serde::{Deserialize, Serialize};

use super::schema::Normalize;

/// The fitted normalisation of one numeric column.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub method: Normalize,
    pub shift: f64,
    pub scale: f64,
    /// Non-missing train values the statistics came from.
    pub train_values: u64,
    /// Missing train values.
    pub train_missing: u64,
}

impl Normalizer {
    /// Fits on raw values, where NaN marks a missing value. With no values at all, every
    /// method maps to `x` (shift 0, scale 1).
    pub fn fit(method: Normalize, values: impl Iterator<Item = f64> + Clone) -> Normalizer {
        let (mut count, mut missing, mut sum) = (0u64, 0u64, 0.0f64);
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for x in values.clone() {
            if x.is_nan() {
                missing += 1;
            } else {
                count += 1;
                sum += x;
                min = min.min(x);
                max = max.max(x);
            }
        }
        let (shift, scale) = if count == 0 {
            (0.0, 1.0)
        } else {
            match method {
                Normalize::None => (0.0, 1.0),
                Normalize::Minmax => {
                    let range = max - min;
                    (min, if range > 0.0 { 1.0 / range } else { 0.0 })
                }
                Normalize::Standard => {
                    let mean = sum / count as f64;
                    let squares: f64 = values.filter(|x| !x.is_nan()).map(|x| (x - mean) * (x - mean)).sum();
                    let std = (squares / count as f64).sqrt();
                    (mean, if std > 0.0 { 1.0 / std } else { 1.0 })
                }
            }
        };
        Normalizer { method, shift, scale, train_values: count, train_missing: missing }
    }

    /// The normalised value of a raw value (NaN = missing → 0).
    #[inline]
    pub fn apply(&self, raw: f64) -> f32 {
        if raw.is_nan() {
            0.0
        } else {
            ((raw - self.shift) * self.scale) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_and_missing_values() {
        let values = [1.0, f64::NAN, 3.0, 5.0];
        let minmax = Normalizer::fit(Normalize::Minmax, values.iter().copied());
        assert_eq!((minmax.train_values, minmax.train_missing), (3, 1));
        assert_eq!(minmax.apply(3.0), 0.5);
        assert_eq!(minmax.apply(f64::NAN), 0.0);
        let standard = Normalizer::fit(Normalize::Standard, values.iter().copied());
        // mean 3, population variance (4 + 0 + 4) / 3.
        assert!((standard.apply(5.0) as f64 - 2.0 / (8.0f64 / 3.0).sqrt()).abs() < 1e-6);
        assert_eq!(standard.apply(3.0), 0.0);
        let constant = Normalizer::fit(Normalize::Minmax, [2.0, 2.0].into_iter());
        assert_eq!(constant.apply(7.0), 0.0);
        assert_eq!(Normalizer::fit(Normalize::None, values.iter().copied()).apply(5.0), 5.0);
    }
}

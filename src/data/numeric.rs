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

/// The statistics of one column's raw train values gathered in one pass (NaN marks a
/// missing value): what [`Normalizer::from_stats`] fits from, whether the values come all at
/// once or block by block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct NumericStats {
    count: u64,
    missing: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Default for NumericStats {
    fn default() -> NumericStats {
        NumericStats { count: 0, missing: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY }
    }
}

impl NumericStats {
    #[inline]
    pub fn add(&mut self, x: f64) {
        if x.is_nan() {
            self.missing += 1;
        } else {
            self.count += 1;
            self.sum += x;
            self.min = self.min.min(x);
            self.max = self.max.max(x);
        }
    }

    /// The mean of the non-missing values (what [`Normalizer::from_stats`]'s squares are
    /// taken around).
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// The sum of `(x - mean)²` over the non-missing values, in order, as a second pass adds it.
pub(crate) fn add_square(squares: &mut f64, x: f64, mean: f64) {
    if !x.is_nan() {
        *squares += (x - mean) * (x - mean);
    }
}

impl Normalizer {
    /// Fits on raw values, where NaN marks a missing value. With no values at all, every
    /// method maps to `x` (shift 0, scale 1).
    pub fn fit(method: Normalize, values: impl Iterator<Item = f64> + Clone) -> Normalizer {
        let mut stats = NumericStats::default();
        values.clone().for_each(|x| stats.add(x));
        Normalizer::from_stats(method, &stats, |mean| {
            let mut squares = 0.0;
            values.for_each(|x| add_square(&mut squares, x, mean));
            squares
        })
    }

    /// Whether fitting `method` needs a second pass over the values (the squares around
    /// the mean).
    pub(crate) fn needs_squares(method: Normalize) -> bool {
        method == Normalize::Standard
    }

    /// Fits from one pass's statistics; `squares` gives the sum of `(x - mean)²` over the
    /// non-missing values when [`needs_squares`](Self::needs_squares) (and there are any).
    pub(crate) fn from_stats(method: Normalize, stats: &NumericStats, squares: impl FnOnce(f64) -> f64) -> Normalizer {
        let (shift, scale) = if stats.count == 0 {
            (0.0, 1.0)
        } else {
            match method {
                Normalize::None => (0.0, 1.0),
                Normalize::Minmax => {
                    let range = stats.max - stats.min;
                    (stats.min, if range > 0.0 { 1.0 / range } else { 0.0 })
                }
                Normalize::Standard => {
                    let mean = stats.mean();
                    let std = (squares(mean) / stats.count as f64).sqrt();
                    (mean, if std > 0.0 { 1.0 / std } else { 1.0 })
                }
            }
        };
        Normalizer { method, shift, scale, train_values: stats.count, train_missing: stats.missing }
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

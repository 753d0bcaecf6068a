//! Concrete values for the `interp` backend: the [`Float`] element trait (f32 and f64),
//! row-major [`Tensor`]s, id vectors ([`Ids`]) and the [`Value`] a node produces.
//!
//! Everything here is plain data with no knowledge of the IR; the eval rules in
//! `ops/*` compute on it.

use std::fmt::{Debug, Display};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// The real element type of a backend: implemented for `f32` and `f64`.
pub trait Float:
    Copy
    + Debug
    + Display
    + Default
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + Send
    + Sync
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    /// Short name for messages (`"f32"`).
    const NAME: &'static str;

    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `ln(1 + self)`, accurate near zero.
    fn ln_1p(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn abs(self) -> Self;
    /// The largest integer not above `self` (±inf, NaN and ±0 unchanged).
    fn floor(self) -> Self;
    /// The larger of two values (the other one when either is NaN).
    fn max(self, other: Self) -> Self;
    fn min(self, other: Self) -> Self;
    fn is_nan(self) -> bool;

    fn from_usize(n: usize) -> Self {
        Self::from_f64(n as f64)
    }
}

macro_rules! impl_float {
    ($t:ident) => {
        impl Float for $t {
            const ZERO: $t = 0.0;
            const ONE: $t = 1.0;
            const NEG_INFINITY: $t = $t::NEG_INFINITY;
            const NAME: &'static str = stringify!($t);

            fn from_f64(v: f64) -> $t {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn exp(self) -> $t {
                $t::exp(self)
            }
            fn ln(self) -> $t {
                $t::ln(self)
            }
            fn ln_1p(self) -> $t {
                $t::ln_1p(self)
            }
            fn sqrt(self) -> $t {
                $t::sqrt(self)
            }
            fn tanh(self) -> $t {
                $t::tanh(self)
            }
            fn abs(self) -> $t {
                $t::abs(self)
            }
            fn floor(self) -> $t {
                $t::floor(self)
            }
            fn max(self, other: $t) -> $t {
                $t::max(self, other)
            }
            fn min(self, other: $t) -> $t {
                $t::min(self, other)
            }
            fn is_nan(self) -> bool {
                $t::is_nan(self)
            }
        }
    };
}

impl_float!(f32);
impl_float!(f64);

/// A row-major array: `data[i0*s0 + i1*s1 + ...]` with `s` the strides of `shape`.
/// `E` is a [`Float`] for real tensors and `u32` for [`Ids`].
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<E> {
    pub shape: Vec<usize>,
    pub data: Vec<E>,
}

/// Integer ids (vocabulary rows, domain ids), the same layout as a tensor.
pub type Ids = Tensor<u32>;

impl<E> Tensor<E> {
    /// A tensor from its shape and row-major data; `None` when the sizes disagree.
    pub fn new(shape: Vec<usize>, data: Vec<E>) -> Option<Tensor<E>> {
        (shape.iter().product::<usize>() == data.len()).then_some(Tensor { shape, data })
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl<E: Copy> Tensor<E> {
    /// A tensor of `shape` with every element `v`.
    pub fn full(shape: Vec<usize>, v: E) -> Tensor<E> {
        let n = shape.iter().product();
        Tensor { shape, data: vec![v; n] }
    }
}

impl<T: Float> Tensor<T> {
    pub fn zeros(shape: Vec<usize>) -> Tensor<T> {
        Tensor::full(shape, T::ZERO)
    }

    pub fn scalar(v: T) -> Tensor<T> {
        Tensor { shape: vec![], data: vec![v] }
    }

    /// The same values in another float type.
    pub fn cast<U: Float>(&self) -> Tensor<U> {
        Tensor { shape: self.shape.clone(), data: self.data.iter().map(|v| U::from_f64(v.to_f64())).collect() }
    }
}

/// The row-major strides of a shape.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The strides with which an operand of `shape` is read when broadcast to `out`: axes
/// aligned from the right; a missing axis or a size-1 axis that stretches reads stride 0.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = strides(shape);
    let lead = out.len() - shape.len().min(out.len());
    (0..out.len()).map(|i| if i < lead || (shape[i - lead] == 1 && out[i] != 1) { 0 } else { own[i - lead] }).collect()
}

/// Calls `f(offset_a, offset_b)` for every index of `shape` in row-major order, where
/// `offset_x = Σ index[i] · strides_x[i]`; offsets are updated incrementally (an odometer).
pub fn walk2(shape: &[usize], strides_a: &[usize], strides_b: &[usize], mut f: impl FnMut(usize, usize)) {
    let n: usize = shape.iter().product();
    let rank = shape.len();
    let mut index = vec![0usize; rank];
    let (mut a, mut b) = (0usize, 0usize);
    for _ in 0..n {
        f(a, b);
        for ax in (0..rank).rev() {
            index[ax] += 1;
            a += strides_a[ax];
            b += strides_b[ax];
            if index[ax] < shape[ax] {
                break;
            }
            a -= strides_a[ax] * shape[ax];
            b -= strides_b[ax] * shape[ax];
            index[ax] = 0;
        }
    }
}

/// The elements of `src` read at `base + Σ index[i] · strides[i]` for every index of
/// `shape` in row-major order (broadcast, permute and slice views made contiguous).
pub fn gather_strided<E: Copy>(src: &[E], shape: &[usize], strides: &[usize], base: usize) -> Vec<E> {
    let mut out = Vec::with_capacity(shape.iter().product());
    let zeros = vec![0; shape.len()];
    walk2(shape, strides, &zeros, |o, _| out.push(src[base + o]));
    out
}

/// What a node produces when evaluated.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<T> {
    Dense(Tensor<T>),
    Ids(Ids),
    /// A row-sparse gradient of a table of nominal `shape` `[V, r...]`: `values[j]` belongs
    /// to row `rows[j]`; a row may appear several times (the entries add up).
    RowSparse {
        shape: Vec<usize>,
        rows: Vec<u32>,
        values: Tensor<T>,
    },
}

impl<T: Float> Value<T> {
    /// The nominal shape (for a row-sparse value, the table's).
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Dense(t) => &t.shape,
            Value::Ids(t) => &t.shape,
            Value::RowSparse { shape, .. } => shape,
        }
    }

    /// What kind of value this is, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Dense(_) => "a dense tensor",
            Value::Ids(_) => "ids",
            Value::RowSparse { .. } => "a row-sparse gradient",
        }
    }

    pub fn as_dense(&self) -> Option<&Tensor<T>> {
        match self {
            Value::Dense(t) => Some(t),
            _ => None,
        }
    }

    pub fn as_ids(&self) -> Option<&Ids> {
        match self {
            Value::Ids(t) => Some(t),
            _ => None,
        }
    }

    /// The value as a dense tensor: a row-sparse value is scattered into zeros with
    /// duplicate rows summed; `None` for ids, or for a row id outside the table.
    pub fn to_dense(&self) -> Option<Tensor<T>> {
        match self {
            Value::Dense(t) => Some(t.clone()),
            Value::Ids(_) => None,
            Value::RowSparse { shape, rows, values } => {
                let mut out = Tensor::zeros(shape.clone());
                let width: usize = shape.iter().skip(1).product();
                let table_rows = shape.first().copied().unwrap_or(0);
                for (j, &r) in rows.iter().enumerate() {
                    let r = r as usize;
                    if r >= table_rows {
                        return None;
                    }
                    let src = &values.data[j * width..(j + 1) * width];
                    for (o, &v) in out.data[r * width..(r + 1) * width].iter_mut().zip(src) {
                        *o += v;
                    }
                }
                Some(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_are_row_major() {
        assert_eq!(strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(strides(&[]), Vec::<usize>::new());
        assert_eq!(strides(&[5]), vec![1]);
    }

    #[test]
    fn row_sparse_to_dense_sums_duplicate_rows() {
        let v: Value<f64> = Value::RowSparse {
            shape: vec![4, 2],
            rows: vec![1, 3, 1],
            values: Tensor::new(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 10.0, 20.0]).unwrap(),
        };
        let d = v.to_dense().unwrap();
        assert_eq!(d.data, vec![0.0, 0.0, 11.0, 22.0, 0.0, 0.0, 3.0, 4.0]);
        let bad: Value<f64> =
            Value::RowSparse { shape: vec![1, 1], rows: vec![5], values: Tensor::new(vec![1, 1], vec![1.0]).unwrap() };
        assert!(bad.to_dense().is_none());
    }

    #[test]
    fn new_checks_sizes() {
        assert!(Tensor::new(vec![2, 2], vec![1.0f32; 3]).is_none());
        assert!(Tensor::new(vec![], vec![1.0f32]).is_some());
    }
}

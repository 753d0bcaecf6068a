//! The optimizer's update rules, each written once: the per-element arithmetic of SGD, Adam
//! and Adagrad (with L2) as [`Rule::step`], a function over an abstract arithmetic
//! ([`UpdateArith`]). The reference loops of [`crate::optim`] evaluate it on numbers
//! ([`Evaluate`]); each backend renders it into its own kernels by running it over an
//! arithmetic that emits code (the jit's Cranelift instructions, the OpenCL backend's C
//! statements), the way one fused-kernel description is rendered by both.
//!
//! A step reads the parameter element `w`, its gradient `g`, the rule's state slots
//! ([`Rule::slots`]: Adam's moments `m`, `v`; Adagrad's accumulator) and the step's
//! coefficients ([`Coeff`], the fields of [`StepCoeffs`]), and gives the new `w` and the new
//! slots. The operations are those of the module docs of [`crate::optim`], in that order,
//! so every rendering that keeps each operation (no fma contraction, IEEE `sqrt` and
//! division) computes the reference's result bit for bit. Where the elements come from
//! (a dense parameter, the touched rows of a table), threads and buffers belong to each
//! backend.

use super::StepCoeffs;
use crate::tensor::Float;

/// Which update rule: what state a parameter keeps and how one element steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    Sgd,
    Adam,
    Adagrad,
}

/// A coefficient of one step, for one class of parameters: the fields of [`StepCoeffs`],
/// in their order ([`Coeff::ALL`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Coeff {
    Lr,
    L2,
    AdamStepSize,
    AdamInvSqrtBias2,
    Beta1,
    OneMinusBeta1,
    Beta2,
    OneMinusBeta2,
    Eps,
}

/// The arithmetic a rule is written in: values of type `V` (numbers, or the code that
/// computes them) and the operations a step uses. Each call is one operation, made in the
/// order the rule states it.
pub trait UpdateArith {
    type V: Copy;
    /// The step's coefficient `c`.
    fn coeff(&mut self, c: Coeff) -> Self::V;
    fn add(&mut self, x: Self::V, y: Self::V) -> Self::V;
    fn sub(&mut self, x: Self::V, y: Self::V) -> Self::V;
    fn mul(&mut self, x: Self::V, y: Self::V) -> Self::V;
    fn div(&mut self, x: Self::V, y: Self::V) -> Self::V;
    fn sqrt(&mut self, x: Self::V) -> Self::V;
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 3] = [Rule::Sgd, Rule::Adam, Rule::Adagrad];

    /// The lower-case name (`sgd`, `adam`, `adagrad`), for kernel names.
    pub fn name(self) -> &'static str {
        match self {
            Rule::Sgd => "sgd",
            Rule::Adam => "adam",
            Rule::Adagrad => "adagrad",
        }
    }

    /// How many state slots a parameter keeps, each in the parameter's layout: Adam two
    /// (`m`, `v`), Adagrad one (the accumulator), SGD none.
    pub fn slots(self) -> usize {
        match self {
            Rule::Sgd => 0,
            Rule::Adam => 2,
            Rule::Adagrad => 1,
        }
    }

    /// One element's step: the new value of the parameter element `w` given its gradient
    /// `g`, with `slots` (the rule's [`Rule::slots`] state values, in order) replaced by
    /// their new values.
    #[inline(always)]
    pub fn step<A: UpdateArith>(self, a: &mut A, w: A::V, g: A::V, slots: &mut [A::V]) -> A::V {
        // L2 first: g ← g + l2·w.
        let l2 = a.coeff(Coeff::L2);
        let decay = a.mul(l2, w);
        let g = a.add(g, decay);
        match self {
            Rule::Sgd => {
                // w ← w − lr·g
                let lr = a.coeff(Coeff::Lr);
                let d = a.mul(lr, g);
                a.sub(w, d)
            }
            Rule::Adam => {
                // m ← β1·m + (1−β1)·g
                let (beta1, one_minus_beta1) = (a.coeff(Coeff::Beta1), a.coeff(Coeff::OneMinusBeta1));
                let x = a.mul(beta1, slots[0]);
                let y = a.mul(one_minus_beta1, g);
                let m = a.add(x, y);
                // v ← β2·v + (1−β2)·g·g
                let (beta2, one_minus_beta2) = (a.coeff(Coeff::Beta2), a.coeff(Coeff::OneMinusBeta2));
                let x = a.mul(beta2, slots[1]);
                let y = a.mul(one_minus_beta2, g);
                let y = a.mul(y, g);
                let v = a.add(x, y);
                slots[0] = m;
                slots[1] = v;
                // w ← w − step_size·m / (sqrt(v)·inv_sqrt_bias2 + ε)
                let root = a.sqrt(v);
                let inv_sqrt_bias2 = a.coeff(Coeff::AdamInvSqrtBias2);
                let root = a.mul(root, inv_sqrt_bias2);
                let eps = a.coeff(Coeff::Eps);
                let den = a.add(root, eps);
                let step_size = a.coeff(Coeff::AdamStepSize);
                let num = a.mul(step_size, m);
                let d = a.div(num, den);
                a.sub(w, d)
            }
            Rule::Adagrad => {
                // acc ← acc + g·g
                let sq = a.mul(g, g);
                let acc = a.add(slots[0], sq);
                slots[0] = acc;
                // w ← w − lr·g / (sqrt(acc) + ε)
                let root = a.sqrt(acc);
                let eps = a.coeff(Coeff::Eps);
                let den = a.add(root, eps);
                let lr = a.coeff(Coeff::Lr);
                let num = a.mul(lr, g);
                let d = a.div(num, den);
                a.sub(w, d)
            }
        }
    }
}

impl Coeff {
    /// Every coefficient, in the order of [`StepCoeffs`]'s fields (the order kernels take
    /// them in).
    pub const ALL: [Coeff; 9] = [
        Coeff::Lr,
        Coeff::L2,
        Coeff::AdamStepSize,
        Coeff::AdamInvSqrtBias2,
        Coeff::Beta1,
        Coeff::OneMinusBeta1,
        Coeff::Beta2,
        Coeff::OneMinusBeta2,
        Coeff::Eps,
    ];

    /// The snake-case name of the field (`lr`, `adam_step_size`, ...), for rendered code.
    pub fn name(self) -> &'static str {
        match self {
            Coeff::Lr => "lr",
            Coeff::L2 => "l2",
            Coeff::AdamStepSize => "adam_step_size",
            Coeff::AdamInvSqrtBias2 => "adam_inv_sqrt_bias2",
            Coeff::Beta1 => "beta1",
            Coeff::OneMinusBeta1 => "one_minus_beta1",
            Coeff::Beta2 => "beta2",
            Coeff::OneMinusBeta2 => "one_minus_beta2",
            Coeff::Eps => "eps",
        }
    }
}

impl<T: Copy> StepCoeffs<T> {
    /// The value of coefficient `c`.
    #[inline(always)]
    pub fn get(&self, c: Coeff) -> T {
        match c {
            Coeff::Lr => self.lr,
            Coeff::L2 => self.l2,
            Coeff::AdamStepSize => self.adam_step_size,
            Coeff::AdamInvSqrtBias2 => self.adam_inv_sqrt_bias2,
            Coeff::Beta1 => self.beta1,
            Coeff::OneMinusBeta1 => self.one_minus_beta1,
            Coeff::Beta2 => self.beta2,
            Coeff::OneMinusBeta2 => self.one_minus_beta2,
            Coeff::Eps => self.eps,
        }
    }

    /// Every coefficient in [`Coeff::ALL`] order.
    pub fn values(&self) -> [T; 9] {
        Coeff::ALL.map(|c| self.get(c))
    }
}

/// The rules evaluated on numbers with one step's coefficients (in [`Coeff::ALL`] order,
/// [`StepCoeffs::values`]): the reference arithmetic.
#[derive(Clone, Copy, Debug)]
pub struct Evaluate<T>(pub [T; 9]);

impl<T: Float> UpdateArith for Evaluate<T> {
    type V = T;
    #[inline(always)]
    fn coeff(&mut self, c: Coeff) -> T {
        self.0[c as usize]
    }
    #[inline(always)]
    fn add(&mut self, x: T, y: T) -> T {
        x + y
    }
    #[inline(always)]
    fn sub(&mut self, x: T, y: T) -> T {
        x - y
    }
    #[inline(always)]
    fn mul(&mut self, x: T, y: T) -> T {
        x * y
    }
    #[inline(always)]
    fn div(&mut self, x: T, y: T) -> T {
        x / y
    }
    #[inline(always)]
    fn sqrt(&mut self, x: T) -> T {
        x.sqrt()
    }
}

//! Symbolic dimensions.
//!
//! A shape in the IR is static except for sizes that only the data can tell: the batch
//! (`B`), the number of columns in a feature group (`count(fields)`), the rows of a
//! vocabulary (`rows(fields)`), the number of domains. Such a size is a [`Sym`]; a
//! dimension is a polynomial with integer coefficients over symbols (`16*count(fields) + 8`),
//! which is closed under the operations shapes need (flatten multiplies, concat adds) and
//! has a canonical form, so two dimensions are equal exactly when their polynomials are.
//! A [`Binding`] gives every symbol a value when a plan is built for real data.
//!
//! Why polynomials instead of plain integers: `mdl check` proves a spec's shapes for every
//! dataset at once, and error messages show `count(fields)*16`, not a number from a guess.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A named size known only once data is bound (e.g. `B`, `count(fields)`).
pub type Sym = Arc<str>;

/// The symbol of the batch size.
pub const BATCH: &str = "B";

/// Values for symbols.
pub type Binding = BTreeMap<String, usize>;

/// A dimension: `Σ coeff · Π symbols`, kept canonical (sorted monomials, no zero terms).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Dim {
    terms: BTreeMap<Vec<Sym>, i64>,
}

impl Dim {
    pub fn lit(n: i64) -> Dim {
        let mut terms = BTreeMap::new();
        if n != 0 {
            terms.insert(Vec::new(), n);
        }
        Dim { terms }
    }

    pub fn sym(name: &str) -> Dim {
        let mut terms = BTreeMap::new();
        terms.insert(vec![Sym::from(name)], 1);
        Dim { terms }
    }

    pub fn batch() -> Dim {
        Dim::sym(BATCH)
    }

    /// The value when the dimension has no symbols.
    pub fn as_const(&self) -> Option<i64> {
        match self.terms.len() {
            0 => Some(0),
            1 => self.terms.get(&Vec::new()).copied(),
            _ => None,
        }
    }

    pub fn is_one(&self) -> bool {
        self.as_const() == Some(1)
    }

    /// Whether the batch symbol occurs in this dimension.
    pub fn has_batch(&self) -> bool {
        self.terms.keys().any(|m| m.iter().any(|s| &**s == BATCH))
    }

    /// The symbols this dimension mentions.
    pub fn symbols(&self) -> impl Iterator<Item = &Sym> {
        self.terms.keys().flat_map(|m| m.iter())
    }

    /// The value under `binding`; an error names the first unbound symbol, or says the
    /// value is negative.
    pub fn eval(&self, binding: &Binding) -> Result<usize, String> {
        let mut total: i64 = 0;
        for (mono, coeff) in &self.terms {
            let mut v = *coeff;
            for s in mono {
                let x = *binding.get(&**s).ok_or_else(|| format!("no value for size `{s}`"))?;
                v = v.checked_mul(x as i64).ok_or("size overflow")?;
            }
            total = total.checked_add(v).ok_or("size overflow")?;
        }
        usize::try_from(total).map_err(|_| format!("size {self} evaluates to {total} < 0"))
    }

    /// Exact division by a constant (`None` if some coefficient is not divisible).
    pub fn div_exact(&self, d: i64) -> Option<Dim> {
        if d == 0 {
            return None;
        }
        let mut terms = BTreeMap::new();
        for (m, c) in &self.terms {
            if c % d != 0 {
                return None;
            }
            terms.insert(m.clone(), c / d);
        }
        Some(Dim { terms })
    }

    /// The dimension as `a·B + b` with `a` and `b` free of the batch symbol, or `None` when
    /// the batch occurs squared (or higher) in a term.
    pub fn split_batch(&self) -> Option<(Dim, Dim)> {
        let (mut a, mut b) = (Dim::default(), Dim::default());
        for (mono, &c) in &self.terms {
            let batch = mono.iter().filter(|s| &***s == BATCH).count();
            let rest: Vec<Sym> = mono.iter().filter(|s| &***s != BATCH).cloned().collect();
            match batch {
                0 => Dim::add_term(&mut b.terms, rest, c),
                1 => Dim::add_term(&mut a.terms, rest, c),
                _ => return None,
            }
        }
        Some((a, b))
    }

    fn add_term(terms: &mut BTreeMap<Vec<Sym>, i64>, mono: Vec<Sym>, c: i64) {
        let e = terms.entry(mono).or_insert(0);
        *e += c;
        if *e == 0 {
            terms.retain(|_, v| *v != 0);
        }
    }
}

impl From<i64> for Dim {
    fn from(n: i64) -> Dim {
        Dim::lit(n)
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::lit(n as i64)
    }
}

impl std::ops::Add for &Dim {
    type Output = Dim;
    fn add(self, rhs: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &rhs.terms {
            Dim::add_term(&mut terms, m.clone(), *c);
        }
        Dim { terms }
    }
}

impl std::ops::Sub for &Dim {
    type Output = Dim;
    fn sub(self, rhs: &Dim) -> Dim {
        let mut terms = self.terms.clone();
        for (m, c) in &rhs.terms {
            Dim::add_term(&mut terms, m.clone(), -*c);
        }
        Dim { terms }
    }
}

impl std::ops::Mul for &Dim {
    type Output = Dim;
    fn mul(self, rhs: &Dim) -> Dim {
        let mut terms = BTreeMap::new();
        for (ma, ca) in &self.terms {
            for (mb, cb) in &rhs.terms {
                let mut m: Vec<Sym> = ma.iter().chain(mb.iter()).cloned().collect();
                m.sort();
                Dim::add_term(&mut terms, m, ca * cb);
            }
        }
        Dim { terms }
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.terms.is_empty() {
            return write!(f, "0");
        }
        // Symbolic terms first (highest degree first), the constant last: `16*count(x) + 3`.
        let mut terms: Vec<(&Vec<Sym>, &i64)> = self.terms.iter().collect();
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(b.0)));
        for (i, (mono, &c)) in terms.iter().enumerate() {
            let (sign, mag) = if c < 0 { ("-", -c) } else { ("+", c) };
            if i == 0 {
                if sign == "-" {
                    write!(f, "-")?;
                }
            } else {
                write!(f, " {sign} ")?;
            }
            let mut parts: Vec<String> = Vec::new();
            if mag != 1 || mono.is_empty() {
                parts.push(mag.to_string());
            }
            parts.extend(mono.iter().map(|s| s.to_string()));
            write!(f, "{}", parts.join("*"))?;
        }
        Ok(())
    }
}

impl fmt::Debug for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A shape: one dimension per axis.
pub type Shape = Vec<Dim>;

/// `[B, 16*count(fields)]`
pub fn shape_to_string(shape: &[Dim]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

/// The product of all dimensions.
pub fn numel(shape: &[Dim]) -> Dim {
    shape.iter().fold(Dim::lit(1), |acc, d| &acc * d)
}

/// Concrete sizes of a shape under a binding.
pub fn eval_shape(shape: &[Dim], binding: &Binding) -> Result<Vec<usize>, String> {
    shape.iter().map(|d| d.eval(binding)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_forms_compare_equal() {
        let f = Dim::sym("count(fields)");
        let a = &(&f * &Dim::lit(16)) + &Dim::lit(8);
        let b = &Dim::lit(8) + &(&Dim::lit(16) * &f);
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "16*count(fields) + 8");
        assert_eq!((&a - &a).as_const(), Some(0));
        let mut bind = Binding::new();
        bind.insert("count(fields)".into(), 3);
        assert_eq!(a.eval(&bind), Ok(56));
        assert!(Dim::sym("B").eval(&Binding::new()).is_err());
        let b = Dim::batch();
        let (slope, rest) = (&(&b * &a) + &Dim::lit(3)).split_batch().expect("linear in B");
        assert_eq!((slope, rest), (a.clone(), Dim::lit(3)));
        assert_eq!((&b * &b).split_batch(), None);
    }

    #[test]
    fn products_sort_symbols() {
        let x = &Dim::sym("a") * &Dim::sym("b");
        let y = &Dim::sym("b") * &Dim::sym("a");
        assert_eq!(x, y);
        assert_eq!(x.to_string(), "a*b");
        assert_eq!((&x * &Dim::lit(-2)).to_string(), "-2*a*b");
    }
}

//! Speed of the jit's matrix products on the shapes CTR models train (`mdl products-bench`,
//! a hidden command; speed is never asserted in tests): the f32 products (`gemm` crate)
//! against every bf16 kernel this CPU runs ([`super::bf16`]), forward and both backward products, and
//! whether a bias-and-relu epilogue applied block by block right after the product (on
//! cache-hot rows) beats the product followed by its own pass over the output.

use super::bf16::{self, Dot};
use super::product::{gemm_into, GEMM_PARALLEL_WORK};
use super::ProductOperands;
use gemm::Parallelism;
use std::time::Instant;

/// One product shape: `[rows, k] · [k, n]` (a linear layer of `k` inputs and `n` outputs
/// over a batch of `rows`), and the models it stands for.
#[derive(Clone, Debug)]
pub struct Shape {
    pub rows: usize,
    pub k: usize,
    pub n: usize,
    pub models: &'static str,
}

/// The shapes of DeepFM's, MMoE's and DCNv2's products on kuairand (48 fields × 16 = 768
/// inputs) at batch 4096.
pub fn ctr_shapes() -> Vec<Shape> {
    let shape = |k, n, models| Shape { rows: 4096, k, n, models };
    vec![
        shape(768, 256, "DeepFM, MMoE experts, DCNv2 DNN: first layer"),
        shape(256, 128, "second layers"),
        shape(768, 768, "DCNv2 cross layer"),
        shape(768, 128, "MMoE gate"),
    ]
}

/// GFLOP/s of one product kind of one shape.
#[derive(Clone, Debug)]
pub struct Speed {
    pub shape: Shape,
    /// `forward y = x·W`, `backward dx = dy·Wᵀ` or `backward dW = xᵀ·dy`.
    pub product: &'static str,
    pub f32_gflops: f64,
    /// Each bf16 kernel this CPU runs, fastest first.
    pub bf16_gflops: Vec<(Dot, f64)>,
}

/// The forward product with a bias-and-relu epilogue, timed two ways (milliseconds).
#[derive(Clone, Debug)]
pub struct Epilogue {
    pub shape: Shape,
    /// The product over all rows (both threads), then the epilogue as its own pass.
    pub separate_ms: f64,
    /// Blocks of `block_rows` rows, each thread taking half of them: the product of a
    /// block (one thread), then the epilogue on the block while it is in cache.
    pub blocked_ms: f64,
    pub block_rows: usize,
}

/// What [`measure`] found, with the bf16 kernels it ran.
#[derive(Clone, Debug)]
pub struct Report {
    pub threads: usize,
    /// Empty without AVX-512F.
    pub dots: Vec<Dot>,
    pub speeds: Vec<Speed>,
    pub epilogues: Vec<Epilogue>,
}

/// The best of `reps` timings of `f` (after one warm-up), in seconds.
fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Deterministic operand values in [-1, 1).
fn values(len: usize, salt: u64) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64::new(salt);
    (0..len).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect()
}

fn bias_relu(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_exact_mut(bias.len()) {
        for (y, b) in row.iter_mut().zip(bias) {
            *y = (*y + b).max(0.0);
        }
    }
}

/// Times every product of every shape on `threads` threads, best of `reps`.
pub fn measure(shapes: &[Shape], threads: usize, reps: usize) -> Report {
    let dots: Vec<Dot> = Dot::ALL.into_iter().filter(|d| d.available()).collect();
    let par = |work: usize| {
        if threads > 1 && work >= GEMM_PARALLEL_WORK {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        }
    };
    // The bf16 kernels' packed operands, kept between repetitions as the jit keeps them
    // between steps.
    let mut pool = super::pool::Pool::default();
    let mut speeds = Vec::new();
    let mut epilogues = Vec::new();
    for shape in shapes {
        let Shape { rows, k, n, .. } = *shape;
        let (x, w, dy) = (values(rows * k, 1), values(k * n, 2), values(rows * n, 3));
        let flop = 2.0 * (rows * k * n) as f64;
        // (name, m, n, k, a, ta, a_cols, b, tb, b_cols)
        type Kind<'a> = (&'static str, usize, usize, usize, &'a [f32], bool, usize, &'a [f32], bool, usize);
        let kinds: [Kind; 3] = [
            ("forward y = x·W", rows, n, k, &x, false, k, &w, false, n),
            ("backward dx = dy·Wᵀ", rows, k, n, &dy, false, n, &w, true, n),
            ("backward dW = xᵀ·dy", k, n, rows, &x, true, k, &dy, false, n),
        ];
        for (product, m, n_out, k_red, a, ta, a_cols, b, tb, b_cols) in kinds {
            let mut out = vec![0f32; m * n_out];
            let f32_time = best_of(reps, || {
                gemm_into(&mut out, m, n_out, k_red, a, ta, a_cols, b, tb, b_cols, par(m * n_out * k_red))
            });
            let bf16_gflops = dots
                .iter()
                .map(|&dot| {
                    let time = best_of(reps, || {
                        let p = ProductOperands { m, n: n_out, k: k_red, a, ta, a_cols, b, tb, b_cols };
                        bf16::product(dot, &mut out, p, threads, &mut pool)
                    });
                    (dot, flop / time / 1e9)
                })
                .collect();
            speeds.push(Speed { shape: shape.clone(), product, f32_gflops: flop / f32_time / 1e9, bf16_gflops });
        }
        let bias = values(n, 4);
        let mut y = vec![0f32; rows * n];
        let separate = best_of(reps, || {
            gemm_into(&mut y, rows, n, k, &x, false, k, &w, false, n, par(rows * n * k));
            let (lo, hi) = y.split_at_mut(rows / 2 * n);
            std::thread::scope(|s| {
                s.spawn(|| bias_relu(lo, &bias));
                bias_relu(hi, &bias);
            });
        });
        for block_rows in [64, 256] {
            let blocked = best_of(reps, || {
                let half = rows / 2;
                let (y_lo, y_hi) = y.split_at_mut(half * n);
                let (x_lo, x_hi) = x.split_at(half * k);
                let part = |y: &mut [f32], x: &[f32]| {
                    for (yb, xb) in y.chunks_mut(block_rows * n).zip(x.chunks(block_rows * k)) {
                        let r = yb.len() / n;
                        gemm_into(yb, r, n, k, xb, false, k, &w, false, n, Parallelism::None);
                        bias_relu(yb, &bias);
                    }
                };
                std::thread::scope(|s| {
                    s.spawn(|| part(y_lo, x_lo));
                    part(y_hi, x_hi);
                });
            });
            epilogues.push(Epilogue {
                shape: shape.clone(),
                separate_ms: separate * 1e3,
                blocked_ms: blocked * 1e3,
                block_rows,
            });
        }
    }
    Report { threads, dots, speeds, epilogues }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "matrix products, {} threads, GFLOP/s (best of the repetitions)", self.threads)?;
        if self.dots.is_empty() {
            writeln!(f, "no bf16 kernel (no AVX-512F)")?;
        }
        let mut head = String::from("| shape [rows, k]·[k, n] | product | f32 (gemm) |");
        let mut rule = String::from("|---|---|---:|");
        for dot in &self.dots {
            head += &format!(" bf16 {} | / f32 |", dot.describe());
            rule += "---:|---:|";
        }
        writeln!(f, "{head}\n{rule}")?;
        for s in &self.speeds {
            write!(
                f,
                "| [{}, {}]·[{}, {}] ({}) | {} | {:.0} |",
                s.shape.rows, s.shape.k, s.shape.k, s.shape.n, s.shape.models, s.product, s.f32_gflops
            )?;
            for (_, gflops) in &s.bf16_gflops {
                write!(f, " {gflops:.0} | {:.2} |", gflops / s.f32_gflops)?;
            }
            writeln!(f)?;
        }
        writeln!(f)?;
        writeln!(f, "forward product + bias + relu, ms (f32):")?;
        writeln!(
            f,
            "| shape | product, then the epilogue's pass | by row blocks, epilogue on the hot block | block rows |"
        )?;
        writeln!(f, "|---|---:|---:|---:|")?;
        for e in &self.epilogues {
            writeln!(
                f,
                "| [{}, {}]·[{}, {}] | {:.3} | {:.3} | {} |",
                e.shape.rows, e.shape.k, e.shape.k, e.shape.n, e.separate_ms, e.blocked_ms, e.block_rows
            )?;
        }
        Ok(())
    }
}

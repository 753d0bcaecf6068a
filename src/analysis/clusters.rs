//! What this module owns: the card's representation discriminability (measure C,
//! `mdl analyze --clusters PROBE`): the per-sample vectors of a probe (the target-aware
//! representation h = Σ w_i (e_i ⊙ v_t) of an attention model) on the test split are
//! clustered by k-means for several k, and the clusters Q(h) are compared with the first
//! task's label Y by their mutual information MI(Q, Y) (nats, as scikit-learn's
//! `mutual_info_score`) and its normalised form NMI = MI / ((H(Q) + H(Y)) / 2) (its default
//! arithmetic mean). A representation that separates the classes gives clusters that
//! predict the label.
//!
//! k-means: k-means++ seeding and Lloyd's iterations (until no sample moves, at most
//! [`MAX_ITERATIONS`]), seeded by the run's seed so that a run's figures repeat. The card's
//! scripts use scikit-learn's MiniBatchKMeans; full-batch Lloyd on the few thousand test rows
//! is affordable here and has no batch-sampling noise. Written here rather than taken from
//! a crate: the one maintained Rust k-means (linfa-clustering) brings ndarray and linfa's
//! stack for thirty lines of arithmetic.

use mdl_runtime::rng::SplitMix64;
use serde::Serialize;

/// Lloyd's iterations at most.
pub const MAX_ITERATIONS: usize = 50;

/// The card's numbers of clusters (its list stops at 1000); a k above a fiftieth of the
/// samples is left out (clusters of a few samples each measure noise, and Lloyd's cost grows
/// with k: the card's Taobao test split has millions of rows, MovieLens's 10,000).
pub const CLUSTER_COUNTS: [usize; 12] = [2, 5, 10, 20, 30, 50, 100, 200, 300, 500, 700, 1000];

fn distance2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

/// The index of the centre nearest to `point` and its squared distance.
fn nearest(point: &[f32], centres: &[Vec<f32>]) -> (usize, f64) {
    let mut best = (0, f64::INFINITY);
    for (c, centre) in centres.iter().enumerate() {
        let d = distance2(point, centre);
        if d < best.1 {
            best = (c, d);
        }
    }
    best
}

/// k-means of the `dim`-wide rows of `data` into `k` clusters: each row's cluster.
pub fn kmeans(data: &[f32], dim: usize, k: usize, seed: u64) -> Vec<usize> {
    let n = data.len() / dim.max(1);
    if n == 0 || k == 0 {
        return vec![0; n];
    }
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut rng = SplitMix64::new(seed);
    // k-means++: each next centre drawn with probability proportional to its squared
    // distance from the nearest centre so far.
    let mut centres: Vec<Vec<f32>> = vec![row(rng.below(n as u64) as usize).to_vec()];
    let mut d2: Vec<f64> = (0..n).map(|i| distance2(row(i), &centres[0])).collect();
    while centres.len() < k {
        let total: f64 = d2.iter().sum();
        if total <= 0.0 {
            break; // fewer distinct points than k
        }
        let mut u = rng.next_f64() * total;
        let mut pick = n - 1;
        for (i, &d) in d2.iter().enumerate() {
            if u < d {
                pick = i;
                break;
            }
            u -= d;
        }
        centres.push(row(pick).to_vec());
        let last = centres.last().expect("a centre");
        for (i, d) in d2.iter_mut().enumerate() {
            *d = d.min(distance2(row(i), last));
        }
    }
    let mut assign: Vec<usize> = (0..n).map(|i| nearest(row(i), &centres).0).collect();
    for _ in 0..MAX_ITERATIONS {
        let mut sums = vec![vec![0.0f64; dim]; centres.len()];
        let mut counts = vec![0usize; centres.len()];
        for (i, &c) in assign.iter().enumerate() {
            counts[c] += 1;
            for (s, &x) in sums[c].iter_mut().zip(row(i)) {
                *s += x as f64;
            }
        }
        for ((centre, sum), &count) in centres.iter_mut().zip(&sums).zip(&counts) {
            if count > 0 {
                *centre = sum.iter().map(|s| (s / count as f64) as f32).collect();
            }
        }
        let next: Vec<usize> = (0..n).map(|i| nearest(row(i), &centres).0).collect();
        if next == assign {
            break;
        }
        assign = next;
    }
    assign
}

/// MI (nats) between two labellings of the same samples, and NMI with the arithmetic mean
/// of their entropies (`None` when both entropies are 0).
pub fn mutual_information(a: &[usize], b: &[usize]) -> (f64, Option<f64>) {
    assert_eq!(a.len(), b.len(), "two labellings of the same samples");
    let n = a.len() as f64;
    let (ka, kb) = (a.iter().max().map_or(0, |m| m + 1), b.iter().max().map_or(0, |m| m + 1));
    let mut joint = vec![0u64; ka * kb];
    let (mut pa, mut pb) = (vec![0u64; ka], vec![0u64; kb]);
    for (&x, &y) in a.iter().zip(b) {
        joint[x * kb + y] += 1;
        pa[x] += 1;
        pb[y] += 1;
    }
    let mut mi = 0.0;
    for x in 0..ka {
        for y in 0..kb {
            let j = joint[x * kb + y] as f64;
            if j > 0.0 {
                mi += j / n * (j * n / (pa[x] as f64 * pb[y] as f64)).ln();
            }
        }
    }
    let entropy = |p: &[u64]| -> f64 { p.iter().filter(|&&c| c > 0).map(|&c| c as f64 / n).map(|q| -q * q.ln()).sum() };
    let mean = (entropy(&pa) + entropy(&pb)) / 2.0;
    (mi.max(0.0), (mean > 0.0).then(|| (mi / mean).clamp(0.0, 1.0)))
}

/// The clustering of one k.
#[derive(Clone, Debug, Serialize)]
pub struct Clustering {
    pub k: usize,
    /// MI(Q, Y) in nats and NMI.
    pub mi: f64,
    pub nmi: Option<f64>,
}

/// `analysis.json`'s `clusters`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterAnalysis {
    pub probe: String,
    pub task: String,
    pub split: String,
    pub rows: usize,
    /// The width of one sample's vector (the probe's values per sample).
    pub dim: usize,
    /// H(Y) in nats, the most MI(Q, Y) can be.
    pub label_entropy: f64,
    pub clusterings: Vec<Clustering>,
}

/// The clusterings of the `dim`-wide rows of `data` with labels `labels`, for each k of
/// [`CLUSTER_COUNTS`] up to a fiftieth of the rows.
pub fn measure(probe: &str, task: &str, data: &[f32], dim: usize, labels: &[usize], seed: u64) -> ClusterAnalysis {
    let rows = labels.len();
    let clusterings = CLUSTER_COUNTS
        .iter()
        .filter(|&&k| k * 50 <= rows)
        .map(|&k| {
            let q = kmeans(data, dim, k, seed ^ k as u64);
            let (mi, nmi) = mutual_information(&q, labels);
            Clustering { k, mi, nmi }
        })
        .collect();
    let label_entropy = mutual_information(labels, labels).0;
    ClusterAnalysis {
        probe: probe.to_string(),
        task: task.to_string(),
        split: "test".into(),
        rows,
        dim,
        label_entropy,
        clusterings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutual_information_of_hand_counts() {
        // Clusters equal to the labels: MI = H(Y), NMI 1.
        let y = [0, 0, 0, 1];
        let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
        let (mi, nmi) = mutual_information(&y, &y);
        assert!((mi - h).abs() < 1e-12 && (nmi.unwrap() - 1.0).abs() < 1e-12);
        // Independent: each cluster holds one sample of each class.
        let (mi, nmi) = mutual_information(&[0, 0, 1, 1], &[0, 1, 0, 1]);
        assert!(mi.abs() < 1e-12 && nmi.unwrap().abs() < 1e-12);
        // By hand: joint (q, y) counts (0,0) 2, (0,1) 1, (1,1) 1 over 4 samples.
        let (mi, nmi) = mutual_information(&[0, 0, 0, 1], &[0, 0, 1, 1]);
        let want =
            0.5 * (2.0 * 4.0 / (3.0 * 2.0f64)).ln() + 0.25 * (4.0 / (3.0 * 2.0f64)).ln() + 0.25 * (4.0 / 2.0f64).ln();
        assert!((mi - want).abs() < 1e-12, "{mi} {want}");
        let (hq, hy) = (h, 2f64.ln());
        assert!((nmi.unwrap() - want / ((hq + hy) / 2.0)).abs() < 1e-12);
        assert_eq!(mutual_information(&[0, 0], &[0, 0]), (0.0, None));
    }

    #[test]
    fn kmeans_recovers_separated_groups() {
        // Three tight groups around (0, 0), (10, 0), (0, 10), interleaved.
        let centres = [(0.0f32, 0.0f32), (10.0, 0.0), (0.0, 10.0)];
        let mut data = Vec::new();
        for i in 0..30 {
            let (x, y) = centres[i % 3];
            let jitter = (i / 3) as f32 * 0.01;
            data.extend_from_slice(&[x + jitter, y - jitter]);
        }
        let q = kmeans(&data, 2, 3, 7);
        let truth: Vec<usize> = (0..30).map(|i| i % 3).collect();
        // The same partition, whatever the cluster numbers.
        let (mi, nmi) = mutual_information(&q, &truth);
        assert!((nmi.unwrap() - 1.0).abs() < 1e-12, "{q:?}");
        assert!((mi - 3f64.ln()).abs() < 1e-12);
        // The same seed gives the same clusters; one cluster puts every row in it.
        assert_eq!(kmeans(&data, 2, 3, 7), q);
        assert_eq!(kmeans(&data, 2, 1, 7), vec![0; 30]);
        // More clusters than distinct points stops at the distinct points.
        let twice = [1.0f32, 1.0, 1.0, 1.0, 5.0, 5.0];
        let q = kmeans(&twice, 2, 3, 1);
        assert_eq!(q[0], q[1]);
        assert_ne!(q[0], q[2]);
    }

    #[test]
    fn measure_skips_ks_above_a_fiftieth_of_the_rows() {
        let data: Vec<f32> = (0..249).map(|i| (i % 2) as f32).collect();
        let labels: Vec<usize> = (0..249).map(|i| i % 2).collect();
        let a = measure("h", "click", &data, 1, &labels, 3);
        let ks: Vec<usize> = a.clusterings.iter().map(|c| c.k).collect();
        assert_eq!(ks, [2]);
        let h = -(125.0 / 249.0 * (125.0f64 / 249.0).ln() + 124.0 / 249.0 * (124.0f64 / 249.0).ln());
        assert!((a.label_entropy - h).abs() < 1e-12);
        assert!((a.clusterings[0].mi - h).abs() < 1e-12, "the two values are the two classes");
    }
}

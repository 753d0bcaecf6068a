//! What this module owns: the card's sub-embedding information abundance of a cross layer
//! (interaction-collapse analysis, measure A; `mdl analyze --interaction TABLE:PARAM`). A
//! DCNv2 cross layer y = x W (W `[N·K, N·K]`, x the N fields' embeddings of width K side by
//! side) sends field i's embedding to output field j through the K × K block
//! W_{i→j} = W[iK..(i+1)K, jK..(j+1)K]; field i's sub-embedding for j is
//! E_i^{→j} = E_i W_{i→j} (the card's E_i W_{i→j}ᵀ with W written output × input), and its
//! IA says how many directions field i keeps for its interaction with j.
//!
//! E_i is the rows of the table's column i that training changed (as for the tables' IA).
//! The table's columns must be the first fields of the layer's input, in order (DCNv2's x0
//! starts with `E[fields]`); fields after them (pooled sequences, tags, numbers) are output
//! blocks only, named by their index. The matrix comes with its row and column sums (the
//! card's Σ_j and Σ_i) and each field's own IA(E_i), by which the card sorts both axes, and
//! with the Frobenius norm ‖W_{i→j}‖_F of every block of the weight (the card's heat map of a
//! multi-embedding model's interaction weights, one per embedding set: `--interaction` on each
//! set's table and cross weight).

use super::{rows_of, Spectrum};
use mdl_runtime::tensor::Tensor;
use serde::Serialize;

/// `analysis.json`'s `interaction`.
#[derive(Clone, Debug, Serialize)]
pub struct InteractionAnalysis {
    pub table: String,
    pub param: String,
    /// The embedding width K and the layer's fields N (its width over K).
    pub dim: usize,
    pub blocks: usize,
    /// The table's columns (rows of the matrix), their trained rows and IA(E_i).
    pub fields: Vec<String>,
    pub trained_rows: Vec<usize>,
    pub field_ia: Vec<Option<f64>>,
    /// Output blocks (columns of the matrix): the table's columns, then `field N` for the rest.
    pub outputs: Vec<String>,
    /// IA(E_i W_{i→j}), `[i][j]`, with its row sums Σ_j and column sums Σ_i.
    pub ia: Vec<Vec<Option<f64>>>,
    pub row_sums: Vec<f64>,
    pub column_sums: Vec<f64>,
    /// ‖W_{i→j}‖_F for every block of the weight, `[i][j]` over all N input and N output
    /// blocks (the table's columns first).
    pub block_norms: Vec<Vec<f64>>,
}

/// The Frobenius norm of every `k × k` block of the square `[n, n]` weight `w`, `[i][j]`.
pub fn block_norms(w: &Tensor<f32>, k: usize) -> Vec<Vec<f64>> {
    let n = w.shape[1];
    let blocks = n / k;
    let mut norms = vec![vec![0.0f64; blocks]; blocks];
    for (r, row) in w.data.chunks(n).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            norms[r / k][c / k] += (v as f64) * (v as f64);
        }
    }
    norms.iter().map(|row| row.iter().map(|s| s.sqrt()).collect()).collect()
}

/// `rows × k` matrix `e` times the `k × k` block of the `[n, n]` weight `w` at block row
/// `i`, block column `j`.
pub fn times_block(e: &[f32], rows: usize, k: usize, w: &Tensor<f32>, i: usize, j: usize) -> Vec<f32> {
    let n = w.shape[1];
    let mut out = vec![0.0f32; rows * k];
    for r in 0..rows {
        for a in 0..k {
            let x = e[r * k + a];
            if x == 0.0 {
                continue;
            }
            let wrow = &w.data[(i * k + a) * n + j * k..(i * k + a) * n + (j + 1) * k];
            for (o, &wv) in out[r * k..(r + 1) * k].iter_mut().zip(wrow) {
                *o += x * wv;
            }
        }
    }
    out
}

/// The sub-embedding IA matrix of table `learned` (`[rows, k]`) through the weight `w`: `fields`
/// are the table's columns, each with the rows of it that training changed.
pub fn measure(
    table: &str,
    param: &str,
    learned: &Tensor<f32>,
    w: &Tensor<f32>,
    fields: &[(String, Vec<usize>)],
) -> Result<InteractionAnalysis, String> {
    let k = *learned.shape.last().unwrap_or(&1);
    let (n_in, n_out) = match w.shape[..] {
        [a, b] => (a, b),
        _ => return Err(format!("--interaction: parameter `{param}` is {:?}, not a matrix [N·K, N·K]", w.shape)),
    };
    if n_in != n_out || n_in % k != 0 || n_in / k < fields.len() {
        return Err(format!(
            "--interaction: parameter `{param}` is [{n_in}, {n_out}]: a cross layer over the {} columns of `{table}` (width {k}) is square, [N·{k}, N·{k}] with N ≥ {}",
            fields.len(),
            fields.len()
        ));
    }
    let blocks = n_in / k;
    let mut ia = Vec::new();
    let mut field_ia = Vec::new();
    for (_, rows) in fields {
        let e = rows_of(learned, rows, k);
        field_ia.push(Spectrum::of(rows.len(), k, &e).ia);
        ia.push(
            (0..blocks)
                .map(|j| Spectrum::of(rows.len(), k, &times_block(&e, rows.len(), k, w, ia.len(), j)).ia)
                .collect::<Vec<_>>(),
        );
    }
    let row_sums = ia.iter().map(|r: &Vec<Option<f64>>| r.iter().flatten().sum()).collect();
    let column_sums = (0..blocks).map(|j| ia.iter().filter_map(|r| r[j]).sum()).collect();
    let names: Vec<String> = fields.iter().map(|(c, _)| c.clone()).collect();
    let outputs = (0..blocks).map(|j| names.get(j).cloned().unwrap_or_else(|| format!("field {}", j + 1))).collect();
    Ok(InteractionAnalysis {
        table: table.to_string(),
        param: param.to_string(),
        dim: k,
        blocks,
        trained_rows: fields.iter().map(|(_, r)| r.len()).collect(),
        fields: names,
        field_ia,
        outputs,
        ia,
        row_sums,
        column_sums,
        block_norms: block_norms(w, k),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_embedding_ia_of_built_blocks() {
        // Two fields of width 2, each with two orthonormal rows (IA 2), and a [4, 4] weight
        // whose blocks are: 1→1 the identity (IA stays 2), 1→2 rank 1 (IA 1), 2→1 zero
        // (no IA), 2→2 diag(2, 1) (σ 2 and 1: IA 1.5).
        let table = Tensor::new(vec![4, 2], vec![1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0]).unwrap();
        #[rustfmt::skip]
        let w = Tensor::new(vec![4, 4], vec![
            1.0, 0.0, 1.0, 1.0,
            0.0, 1.0, 0.0, 0.0,
            0.0, 0.0, 2.0, 0.0,
            0.0, 0.0, 0.0, 1.0,
        ]).unwrap();
        let fields = vec![("a".to_string(), vec![0, 1]), ("b".to_string(), vec![2, 3])];
        let m = measure("E/table", "W", &table, &w, &fields).unwrap();
        assert_eq!((m.dim, m.blocks), (2, 2));
        let close = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() < 1e-9;
        assert!(close(m.ia[0][0], 2.0) && close(m.ia[0][1], 1.0), "{:?}", m.ia);
        assert_eq!(m.ia[1][0], None);
        assert!(close(m.ia[1][1], 1.5), "{:?}", m.ia);
        assert!(close(m.field_ia[0], 2.0) && close(m.field_ia[1], 2.0));
        assert!((m.row_sums[0] - 3.0).abs() < 1e-9 && (m.row_sums[1] - 1.5).abs() < 1e-9);
        assert!((m.column_sums[0] - 2.0).abs() < 1e-9 && (m.column_sums[1] - 2.5).abs() < 1e-9);
        assert_eq!(m.outputs, ["a", "b"]);
        // ‖W_{i→j}‖_F: identity √2, rank-1 [[1, 1], [0, 0]] √2, zero 0, diag(2, 1) √5.
        let r2 = 2f64.sqrt();
        assert_eq!(m.block_norms, vec![vec![r2, r2], vec![0.0, 5f64.sqrt()]]);
        // A wider layer: the blocks past the table's columns are named by index.
        let wide = Tensor::new(vec![6, 6], vec![0.0; 36]).unwrap();
        assert_eq!(measure("E/table", "W", &table, &wide, &fields).unwrap().outputs, ["a", "b", "field 3"]);
        let err =
            measure("E/table", "W", &table, &Tensor::new(vec![4, 6], vec![0.0; 24]).unwrap(), &fields).unwrap_err();
        assert!(
            err.contains("parameter `W` is [4, 6]: a cross layer over the 2 columns of `E/table` (width 2) is square"),
            "{err}"
        );
    }
}

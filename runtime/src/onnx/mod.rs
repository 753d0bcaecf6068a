//! The ONNX renderer: a forward graph of the IR as a standard ONNX model (opset 17, IR
//! version 8) that onnxruntime runs, its parameters inside as initializers.
//!
//! It lives in the runtime, beside the other renderings of the ops (the jit's Cranelift, the
//! OpenCL C): [`Renderer::op`] is an exhaustive `match` over [`Op`], and the elementwise
//! renderings are exhaustive over [`UnaryOp`] and [`BinaryOp`], so an op added without an
//! ONNX rendering does not compile. It reads only the IR (no spec, no data), so nothing
//! downstream is reached: the compiler prepares the graph (its outputs named as the model
//! should name them) and the sizes, and writes the file.
//!
//! Shapes: every symbol but the batch `B` is bound by `sizes` and becomes a number; `B` is
//! the named dimension `B` of the inputs and outputs. A size an op needs that mentions `B`
//! (a reshape's target, a broadcast's) is computed in the model from the batch size, read
//! with `Shape` from an input that has a batch axis. Ids are `int64`, reals `float`.
//!
//! Ops an evaluation graph never holds (the gradient ops `SparseRows` and `GroupOuter`),
//! and constant tensors whose size depends on the batch, are an [`OnnxError`] naming the
//! op and where in the spec it comes from, never a panic. Dropout masks are all ones, as
//! in evaluation. The messages are `prost` structs (`proto.rs`).

pub mod proto;

use crate::exec::{EvalCx, Mode};
use crate::ir::dim::{shape_to_string, Binding, Dim, BATCH};
use crate::ir::graph::{Graph, NodeId};
use crate::ops::elementwise::{GELU_A, GELU_K};
use crate::ops::fused::Instr;
use crate::ops::{self, BinaryOp, DType, Op, ReduceOp, UnaryOp};
use crate::tensor::{Tensor, Value};
use proto::{attribute_type, data_type, AttributeProto, NodeProto, TensorProto};
use std::collections::HashMap;
use std::fmt;

/// The ONNX operator set the models use.
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with [`OPSET`].
pub const IR_VERSION: i64 = 8;

/// Why a graph cannot be exported.
#[derive(Clone, Debug, PartialEq)]
pub struct OnnxError(pub String);

impl fmt::Display for OnnxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OnnxError {}

/// What to write besides the graph.
#[derive(Clone, Debug, Default)]
pub struct ModelInfo {
    /// `producer_name` / `producer_version`.
    pub producer: (String, String),
    /// `doc_string` of the model.
    pub doc: String,
    /// `metadata_props`.
    pub metadata: Vec<(String, String)>,
}

/// Renders `graph` as an ONNX model: its `outputs` (by their names) are the model's
/// outputs, the `inputs` they read its inputs, its parameters and states (running
/// statistics) the initializers (values from `params`, by name). `sizes` binds every symbol but `B`.
pub fn render(
    graph: &Graph,
    sizes: &Binding,
    params: &HashMap<String, Tensor<f32>>,
    info: &ModelInfo,
) -> Result<proto::ModelProto, OnnxError> {
    let mut r = Renderer { graph, sizes, nodes: Vec::new(), initializers: Vec::new(), fresh: 0, batch: None };
    // Only what the outputs read: an input nothing reads (a label) is no model input.
    let mut needed = vec![false; graph.len()];
    for &id in graph.outputs.values() {
        needed[id.index()] = true;
    }
    for id in graph.ids().collect::<Vec<_>>().into_iter().rev() {
        if needed[id.index()] {
            for &i in &graph.node(id).inputs {
                needed[i.index()] = true;
            }
        }
    }
    let mut names: Vec<String> = Vec::with_capacity(graph.len());
    let mut inputs = Vec::new();
    for id in graph.ids() {
        let node = graph.node(id);
        if !needed[id.index()] {
            names.push(String::new());
            continue;
        }
        let name = match &node.op {
            Op::Input { name, dtype } => {
                inputs.push(r.value_info(name, *dtype, &node.sig.shape)?);
                name.clone()
            }
            Op::Param { name } => {
                let value = params
                    .get(name)
                    .ok_or_else(|| OnnxError(format!("parameter `{name}` has no value in the checkpoint")))?;
                let want = r.concrete_shape(&node.sig.shape, id)?;
                if value.shape != want {
                    return Err(OnnxError(format!(
                        "parameter `{name}` is {:?} in the checkpoint but {} in the model",
                        value.shape,
                        shape_to_string(&node.sig.shape)
                    )));
                }
                r.initializers.push(float_tensor(name, &value.shape, &value.data));
                name.clone()
            }
            _ => {
                let args: Vec<&str> = node.inputs.iter().map(|i| names[i.index()].as_str()).collect();
                r.op(id, &args)?
            }
        };
        names.push(name);
    }
    let mut outputs = Vec::new();
    for (name, &id) in &graph.outputs {
        if inputs.iter().any(|i: &proto::ValueInfoProto| &i.name == name) || params.contains_key(name) {
            return Err(OnnxError(format!("output `{name}` has the name of an input or parameter")));
        }
        r.nodes.push(node_proto("Identity", &[&names[id.index()]], name, Vec::new()));
        let sig = graph.sig(id);
        outputs.push(r.value_info(name, sig.dtype, &sig.shape)?);
    }
    let graph_proto = proto::GraphProto {
        node: r.nodes,
        name: "mdl".into(),
        initializer: r.initializers,
        input: inputs,
        output: outputs,
    };
    Ok(proto::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![proto::OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: info.producer.0.clone(),
        producer_version: info.producer.1.clone(),
        doc_string: info.doc.clone(),
        graph: Some(graph_proto),
        metadata_props: info
            .metadata
            .iter()
            .map(|(key, value)| proto::StringStringEntryProto { key: key.clone(), value: value.clone() })
            .collect(),
    })
}

/// A size as the model computes it: a number, or `a·B + b`.
enum Size {
    Known(i64),
    Batch { a: i64, b: i64 },
}

struct Renderer<'g> {
    graph: &'g Graph,
    sizes: &'g Binding,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    fresh: usize,
    /// The batch size as an `int64 [1]` value, once something needed it.
    batch: Option<String>,
}

fn node_proto(op_type: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        name: format!("{op_type}:{output}"),
        op_type: op_type.into(),
        attribute,
        doc_string: String::new(),
    }
}

fn float_tensor(name: &str, shape: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: data_type::FLOAT,
        name: name.into(),
        raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn int_tensor(name: &str, shape: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: data_type::INT64,
        name: name.into(),
        raw_data: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INT, i, ..Default::default() }
}

fn ints_attr(name: &str, ints: Vec<i64>) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INTS, ints, ..Default::default() }
}

fn string_attr(name: &str, s: &str) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::STRING, s: s.as_bytes().to_vec(), ..Default::default() }
}

fn tensor_attr(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::TENSOR, t: Some(t), ..Default::default() }
}

fn onnx_dtype(dtype: DType) -> i32 {
    match dtype {
        DType::F => data_type::FLOAT,
        DType::I => data_type::INT64,
    }
}

impl Renderer<'_> {
    /// Adds a node with one fresh output and returns that output's name.
    fn emit(&mut self, op_type: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        self.fresh += 1;
        let out = format!("t{}", self.fresh);
        self.nodes.push(node_proto(op_type, inputs, &out, attribute));
        out
    }

    fn fresh_name(&mut self, what: &str) -> String {
        self.fresh += 1;
        format!("{what}{}", self.fresh)
    }

    fn const_f32(&mut self, shape: &[usize], data: &[f32]) -> String {
        let name = self.fresh_name("c");
        self.initializers.push(float_tensor(&name, shape, data));
        name
    }

    fn const_i64(&mut self, shape: &[usize], data: &[i64]) -> String {
        let name = self.fresh_name("c");
        self.initializers.push(int_tensor(&name, shape, data));
        name
    }

    fn scalar(&mut self, v: f64) -> String {
        self.const_f32(&[], &[v as f32])
    }

    fn error(&self, id: NodeId, why: impl fmt::Display) -> OnnxError {
        let node = self.graph.node(id);
        let at = if node.scope.is_empty() { String::new() } else { format!(" (at `{}` in the spec)", node.scope) };
        OnnxError(format!("cannot export op {}{at}: {why}", node.op.name()))
    }

    /// A dimension under `sizes`, `B` kept as a symbol.
    fn size(&self, d: &Dim, id: NodeId) -> Result<Size, OnnxError> {
        let (a, b) = d.split_batch().ok_or_else(|| self.error(id, format!("the size {d} is not linear in B")))?;
        let value = |x: &Dim| x.eval(self.sizes).map(|v| v as i64).map_err(|e| self.error(id, e));
        Ok(match value(&a)? {
            0 => Size::Known(value(&b)?),
            a => Size::Batch { a, b: value(&b)? },
        })
    }

    /// The sizes of a shape that must not depend on the batch (a parameter's, a constant's).
    fn concrete_shape(&self, shape: &[Dim], id: NodeId) -> Result<Vec<usize>, OnnxError> {
        shape
            .iter()
            .map(|d| match self.size(d, id)? {
                Size::Known(n) => Ok(n as usize),
                Size::Batch { .. } => Err(self.error(id, format!("its size {d} depends on the batch"))),
            })
            .collect()
    }

    fn value_info(&self, name: &str, dtype: DType, shape: &[Dim]) -> Result<proto::ValueInfoProto, OnnxError> {
        let mut dim = Vec::with_capacity(shape.len());
        for d in shape {
            let (a, b) =
                d.split_batch().ok_or_else(|| OnnxError(format!("`{name}`: the size {d} is not linear in B")))?;
            let value = if a.as_const() == Some(0) {
                proto::DimensionValue::DimValue(
                    b.eval(self.sizes).map_err(|e| OnnxError(format!("`{name}`: {e}")))? as i64
                )
            } else {
                proto::DimensionValue::DimParam(d.to_string())
            };
            dim.push(proto::Dimension { value: Some(value) });
        }
        Ok(proto::ValueInfoProto {
            name: name.into(),
            r#type: Some(proto::TypeProto {
                tensor_type: Some(proto::TensorTypeProto {
                    elem_type: onnx_dtype(dtype),
                    shape: Some(proto::TensorShapeProto { dim }),
                }),
            }),
            doc_string: String::new(),
        })
    }

    /// The batch size, `int64 [1]`, read from the first input with a `B` axis.
    fn batch(&mut self, id: NodeId) -> Result<String, OnnxError> {
        if let Some(b) = &self.batch {
            return Ok(b.clone());
        }
        let (input, axis) = self
            .graph
            .inputs
            .iter()
            .find_map(|i| i.shape.iter().position(|d| d == &Dim::batch()).map(|axis| (i.name.clone(), axis)))
            .ok_or_else(|| self.error(id, format!("no input has a `{BATCH}` axis to read the batch size from")))?;
        let b = self.emit("Shape", &[&input], vec![int_attr("start", axis as i64), int_attr("end", axis as i64 + 1)]);
        self.batch = Some(b.clone());
        Ok(b)
    }

    /// A shape as an `int64 [rank]` value (a constant unless it mentions `B`).
    fn shape_value(&mut self, shape: &[Dim], id: NodeId) -> Result<String, OnnxError> {
        let sizes: Vec<Size> = shape.iter().map(|d| self.size(d, id)).collect::<Result<_, _>>()?;
        if let Some(known) =
            sizes.iter().map(|s| if let Size::Known(n) = s { Some(*n) } else { None }).collect::<Option<Vec<i64>>>()
        {
            return Ok(self.const_i64(&[known.len()], &known));
        }
        let mut parts = Vec::with_capacity(sizes.len());
        for s in sizes {
            parts.push(self.size_value(s, id)?);
        }
        if parts.len() == 1 {
            return Ok(parts.remove(0));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        Ok(self.emit("Concat", &refs, vec![int_attr("axis", 0)]))
    }

    /// One size as an `int64 [1]` value.
    fn size_value(&mut self, s: Size, id: NodeId) -> Result<String, OnnxError> {
        match s {
            Size::Known(n) => Ok(self.const_i64(&[1], &[n])),
            Size::Batch { a, b } => {
                let mut v = self.batch(id)?;
                if a != 1 {
                    let c = self.const_i64(&[1], &[a]);
                    v = self.emit("Mul", &[&v, &c], vec![]);
                }
                if b != 0 {
                    let c = self.const_i64(&[1], &[b]);
                    v = self.emit("Add", &[&v, &c], vec![]);
                }
                Ok(v)
            }
        }
    }

    fn dim_value(&mut self, d: &Dim, id: NodeId) -> Result<String, OnnxError> {
        let s = self.size(d, id)?;
        self.size_value(s, id)
    }

    /// `x` stretched (numpy rules) to `shape`.
    fn expand_to(&mut self, x: &str, shape: &[Dim], id: NodeId) -> Result<String, OnnxError> {
        let shape = self.shape_value(shape, id)?;
        Ok(self.emit("Expand", &[x, &shape], vec![]))
    }

    /// A 0/1 float from a boolean.
    fn indicator(&mut self, test: &str, a: &str, b: &str) -> String {
        let t = self.emit(test, &[a, b], vec![]);
        self.emit("Cast", &[&t], vec![int_attr("to", data_type::FLOAT as i64)])
    }

    fn unary(&mut self, op: UnaryOp, x: &str) -> String {
        match op {
            UnaryOp::Neg => self.emit("Neg", &[x], vec![]),
            UnaryOp::Exp => self.emit("Exp", &[x], vec![]),
            UnaryOp::Log => self.emit("Log", &[x], vec![]),
            UnaryOp::Sqrt => self.emit("Sqrt", &[x], vec![]),
            UnaryOp::Recip => self.emit("Reciprocal", &[x], vec![]),
            UnaryOp::Relu => self.emit("Relu", &[x], vec![]),
            UnaryOp::Sigmoid => self.emit("Sigmoid", &[x], vec![]),
            UnaryOp::Tanh => self.emit("Tanh", &[x], vec![]),
            UnaryOp::Softplus => {
                // max(x, 0) + log(1 + e^-|x|): stable for every x, as `UnaryOp::apply`.
                let pos = self.emit("Relu", &[x], vec![]);
                let abs = self.emit("Abs", &[x], vec![]);
                let neg = self.emit("Neg", &[&abs], vec![]);
                let e = self.emit("Exp", &[&neg], vec![]);
                let one = self.scalar(1.0);
                let sum = self.emit("Add", &[&one, &e], vec![]);
                let log = self.emit("Log", &[&sum], vec![]);
                self.emit("Add", &[&pos, &log], vec![])
            }
            UnaryOp::Abs => self.emit("Abs", &[x], vec![]),
            UnaryOp::Step => {
                let zero = self.scalar(0.0);
                self.indicator("Greater", x, &zero)
            }
            UnaryOp::Sign => self.emit("Sign", &[x], vec![]),
            UnaryOp::Floor => self.emit("Floor", &[x], vec![]),
            UnaryOp::Gelu => {
                // x · σ(k · (x + a·x³)), and 0 where the sigmoid is 0 (gelu(-inf) = 0).
                let x2 = self.emit("Mul", &[x, x], vec![]);
                let x3 = self.emit("Mul", &[&x2, x], vec![]);
                let a = self.scalar(GELU_A);
                let ax3 = self.emit("Mul", &[&a, &x3], vec![]);
                let inner = self.emit("Add", &[x, &ax3], vec![]);
                let k = self.scalar(GELU_K);
                let z = self.emit("Mul", &[&k, &inner], vec![]);
                let s = self.emit("Sigmoid", &[&z], vec![]);
                let zero = self.scalar(0.0);
                let none = self.emit("Equal", &[&s, &zero], vec![]);
                let y = self.emit("Mul", &[x, &s], vec![]);
                self.emit("Where", &[&none, &zero, &y], vec![])
            }
        }
    }

    fn binary(&mut self, op: BinaryOp, a: &str, b: &str) -> String {
        match op {
            BinaryOp::Add => self.emit("Add", &[a, b], vec![]),
            BinaryOp::Sub => self.emit("Sub", &[a, b], vec![]),
            BinaryOp::Mul => self.emit("Mul", &[a, b], vec![]),
            BinaryOp::Div => self.emit("Div", &[a, b], vec![]),
            BinaryOp::Max => self.emit("Max", &[a, b], vec![]),
            BinaryOp::Min => self.emit("Min", &[a, b], vec![]),
            BinaryOp::Gt => self.indicator("Greater", a, b),
            BinaryOp::Eq => self.indicator("Equal", a, b),
            BinaryOp::Ge => self.indicator("GreaterOrEqual", a, b),
            BinaryOp::Ne => {
                let eq = self.emit("Equal", &[a, b], vec![]);
                let ne = self.emit("Not", &[&eq], vec![]);
                self.emit("Cast", &[&ne], vec![int_attr("to", data_type::FLOAT as i64)])
            }
            BinaryOp::Prelu => {
                // a where a > 0, else b·a (broadcast as the op's operands are).
                let zero = self.scalar(0.0);
                let pos = self.emit("Greater", &[a, &zero], vec![]);
                let scaled = self.emit("Mul", &[b, a], vec![]);
                self.emit("Where", &[&pos, a, &scaled], vec![])
            }
            BinaryOp::Keep => {
                // b where a != 0 (NaN included), else -0.
                let zero = self.scalar(0.0);
                let eq = self.emit("Equal", &[a, &zero], vec![]);
                let cond = self.emit("Not", &[&eq], vec![]);
                let neg_zero = self.scalar(-0.0);
                self.emit("Where", &[&cond, b, &neg_zero], vec![])
            }
        }
    }

    fn reduce(&mut self, op: ReduceOp, axes: &[usize], keep_dims: bool, x: &str) -> String {
        if axes.is_empty() {
            return self.emit("Identity", &[x], vec![]);
        }
        let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
        let keep = int_attr("keepdims", i64::from(keep_dims));
        match op {
            ReduceOp::Sum => {
                // Opset 13 made ReduceSum's axes an input; the others follow in opset 18.
                let axes = self.const_i64(&[axes.len()], &axes);
                self.emit("ReduceSum", &[x, &axes], vec![keep])
            }
            ReduceOp::Mean => self.emit("ReduceMean", &[x], vec![ints_attr("axes", axes), keep]),
            ReduceOp::Max => self.emit("ReduceMax", &[x], vec![ints_attr("axes", axes), keep]),
            ReduceOp::Min => self.emit("ReduceMin", &[x], vec![ints_attr("axes", axes), keep]),
        }
    }

    /// `x` with its last two axes swapped.
    fn transpose_last(&mut self, x: &str, rank: usize) -> String {
        let mut perm: Vec<i64> = (0..rank as i64).collect();
        perm.swap(rank - 2, rank - 1);
        self.emit("Transpose", &[x], vec![ints_attr("perm", perm)])
    }

    /// A constant tensor of the op's own size (Arange, Triangle, Eye), from its eval rule.
    fn constant(&mut self, id: NodeId) -> Result<String, OnnxError> {
        let node = self.graph.node(id);
        let shape = self.concrete_shape(&node.sig.shape, id)?;
        let mode = Mode::eval();
        let cx = EvalCx { binding: self.sizes, mode: &mode, out_shape: &shape };
        match ops::eval::<f32>(&node.op, &[], &cx).map_err(|e| self.error(id, e))? {
            Value::Dense(t) => Ok(self.const_f32(&t.shape, &t.data)),
            _ => Err(self.error(id, "its eval rule gave no dense tensor")),
        }
    }

    /// The rendering of node `id`, whose operands are the values `x`; returns its value.
    fn op(&mut self, id: NodeId, x: &[&str]) -> Result<String, OnnxError> {
        let node = self.graph.node(id);
        let rank_of = |i: usize| self.graph.shape(node.inputs[i]).len();
        Ok(match &node.op {
            Op::Input { .. } | Op::Param { .. } => return Err(self.error(id, "inputs and parameters are not ops")),
            Op::Scalar(v) => self.scalar(*v),
            Op::Arange { .. } | Op::Triangle { .. } | Op::Eye { .. } => self.constant(id)?,
            Op::IdList { ids } => {
                let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
                self.const_i64(&[ids.len()], &ids)
            }
            Op::DropMask { .. } => {
                // Evaluation: every element kept, a mask of ones of x's shape.
                let shape = self.emit("Shape", &[x[0]], vec![]);
                let one = tensor_attr("value", float_tensor("", &[1], &[1.0]));
                self.emit("ConstantOfShape", &[&shape], vec![one])
            }
            // An export is evaluation, where a Bernoulli mask is its expectation p.
            Op::Bernoulli { p, .. } => {
                let shape = self.emit("Shape", &[x[0]], vec![]);
                let value = tensor_attr("value", float_tensor("", &[1], &[*p as f32]));
                self.emit("ConstantOfShape", &[&shape], vec![value])
            }
            Op::Counter(_) => {
                return Err(
                    self.error(id, "the training loop's counter exists only in training (evaluation reads its state)")
                )
            }
            Op::Permutation { .. } | Op::SampleIds { .. } => {
                return Err(self.error(
                    id,
                    "random draws are not exported; keep them out of the logits with if_training(drawn, fixed)",
                ))
            }
            Op::StopGrad | Op::Path { .. } => self.emit("Identity", &[x[0]], vec![]),
            // An export is evaluation: the running statistic (a state, an initializer).
            Op::TrainEval => self.emit("Identity", &[x[1]], vec![]),
            Op::Unary(u) => self.unary(*u, x[0]),
            Op::Binary(b) => self.binary(*b, x[0], x[1]),
            Op::Reshape { shape } => {
                let shape = self.shape_value(shape, id)?;
                self.emit("Reshape", &[x[0], &shape], vec![int_attr("allowzero", 1)])
            }
            Op::Permute { perm } => {
                self.emit("Transpose", &[x[0]], vec![ints_attr("perm", perm.iter().map(|&p| p as i64).collect())])
            }
            Op::Broadcast { shape } => {
                let shape = self.shape_value(shape, id)?;
                self.emit("Expand", &[x[0], &shape], vec![])
            }
            Op::Concat { axis } => self.emit("Concat", x, vec![int_attr("axis", *axis as i64)]),
            Op::Slice { axis, start, len } => {
                let starts = self.dim_value(start, id)?;
                let ends = self.dim_value(&(start + len), id)?;
                let axes = self.const_i64(&[1], &[*axis as i64]);
                self.emit("Slice", &[x[0], &starts, &ends, &axes], vec![])
            }
            Op::Pad { axis, before, after } => {
                let rank = rank_of(0);
                let zero = Dim::lit(0);
                let widths: Vec<&Dim> = (0..2 * rank)
                    .map(|i| match (i < rank, i % rank == *axis) {
                        (true, true) => before,
                        (false, true) => after,
                        _ => &zero,
                    })
                    .collect();
                let mut parts = Vec::with_capacity(widths.len());
                for w in widths {
                    parts.push(self.dim_value(w, id)?);
                }
                let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
                let pads = self.emit("Concat", &refs, vec![int_attr("axis", 0)]);
                self.emit("Pad", &[x[0], &pads], vec![])
            }
            Op::Reduce { op, axes, keep_dims } => self.reduce(*op, axes, *keep_dims, x[0]),
            Op::Softmax { axis } => self.emit("Softmax", &[x[0]], vec![int_attr("axis", *axis as i64)]),
            Op::MatMul { trans_a, trans_b } => {
                let a = if *trans_a { self.transpose_last(x[0], rank_of(0)) } else { x[0].to_string() };
                let b = if *trans_b { self.transpose_last(x[1], rank_of(1)) } else { x[1].to_string() };
                self.emit("MatMul", &[&a, &b], vec![])
            }
            Op::GroupMatMul { trans_w } => {
                // Row i: x[i] @ w[idx[i]], as a Gather of each row's weight and a batched MatMul.
                let w = self.emit("Gather", &[x[1], x[2]], vec![int_attr("axis", 0)]);
                let w = if *trans_w { self.transpose_last(&w, 3) } else { w };
                let one = self.const_i64(&[1], &[1]);
                let rows = self.emit("Unsqueeze", &[x[0], &one], vec![]);
                let y = self.emit("MatMul", &[&rows, &w], vec![]);
                self.emit("Squeeze", &[&y, &one], vec![])
            }
            Op::GroupOuter { .. } | Op::SparseRows { .. } => {
                return Err(self.error(id, "it is a gradient op, which an evaluation graph does not hold"))
            }
            Op::SegmentSum { segments } => {
                // out[g] = Σ_{i: idx[i] = g} x[i]: zeros with every row added at its segment.
                let mut shape = vec![segments.clone()];
                shape.extend(self.graph.shape(node.inputs[0])[1..].iter().cloned());
                let shape = self.shape_value(&shape, id)?;
                let zero = tensor_attr("value", float_tensor("", &[1], &[0.0]));
                let zeros = self.emit("ConstantOfShape", &[&shape], vec![zero]);
                let one = self.const_i64(&[1], &[1]);
                let at = self.emit("Unsqueeze", &[x[1], &one], vec![]);
                self.emit("ScatterND", &[&zeros, &at, x[0]], vec![string_attr("reduction", "add")])
            }
            Op::Gather => self.emit("Gather", &[x[0], x[1]], vec![int_attr("axis", 0)]),
            Op::OneHot { depth } => {
                let depth = self.dim_value(depth, id)?;
                let values = self.const_f32(&[2], &[0.0, 1.0]);
                self.emit("OneHot", &[x[0], &depth, &values], vec![int_attr("axis", -1)])
            }
            Op::Bucketize { boundaries } => {
                if boundaries.is_empty() {
                    let shape = self.emit("Shape", &[x[0]], vec![]);
                    let zero = tensor_attr("value", int_tensor("", &[1], &[0]));
                    self.emit("ConstantOfShape", &[&shape], vec![zero])
                } else {
                    // How many boundaries are <= x: compare against all of them, count.
                    let bounds: Vec<f32> = boundaries.iter().map(|&b| b as f32).collect();
                    let bounds = self.const_f32(&[bounds.len()], &bounds);
                    let last = self.const_i64(&[1], &[-1]);
                    let column = self.emit("Unsqueeze", &[x[0], &last], vec![]);
                    let passed = self.emit("GreaterOrEqual", &[&column, &bounds], vec![]);
                    let ones = self.emit("Cast", &[&passed], vec![int_attr("to", data_type::INT64 as i64)]);
                    self.emit("ReduceSum", &[&ones, &last], vec![int_attr("keepdims", 0)])
                }
            }
            Op::IdDiv { by } => {
                // Ids are never negative, so truncation is rounding down.
                let by = self.const_i64(&[], &[*by as i64]);
                self.emit("Div", &[x[0], &by], vec![])
            }
            Op::IdMod { by } => {
                let by = self.const_i64(&[], &[*by as i64]);
                self.emit("Mod", &[x[0], &by], vec![int_attr("fmod", 0)])
            }
            Op::GroupIds { rows } => {
                // ids + group * rows, the groups [N] given the ids' trailing axes of size 1.
                let rank = node.sig.shape.len();
                let rows = self.dim_value(rows, id)?;
                let moved = self.emit("Mul", &[x[1], &rows], vec![]);
                let moved = if rank > 1 {
                    let axes: Vec<i64> = (1..rank as i64).collect();
                    let axes = self.const_i64(&[axes.len()], &axes);
                    self.emit("Unsqueeze", &[&moved, &axes], vec![])
                } else {
                    moved
                };
                self.emit("Add", &[x[0], &moved], vec![])
            }
            Op::TakeAlong { axis } => {
                // numpy's take_along_axis: GatherElements, once the ids are stretched
                // over the axes where they have size 1.
                let at = self.expand_to(x[1], &node.sig.shape, id)?;
                self.emit("GatherElements", &[x[0], &at], vec![int_attr("axis", *axis as i64)])
            }
            Op::ScatterAdd { axis, .. } => {
                let src = self.graph.shape(node.inputs[0]).to_vec();
                let at = self.expand_to(x[1], &src, id)?;
                let shape = self.shape_value(&node.sig.shape, id)?;
                let zero = tensor_attr("value", float_tensor("", &[1], &[0.0]));
                let zeros = self.emit("ConstantOfShape", &[&shape], vec![zero]);
                let attrs = vec![int_attr("axis", *axis as i64), string_attr("reduction", "add")];
                self.emit("ScatterElements", &[&zeros, &at, x[0]], attrs)
            }
            Op::TopK { axis, k, largest } => {
                // The second output: the positions (equal values lowest position first).
                let k = self.dim_value(k, id)?;
                let attrs = vec![
                    int_attr("axis", *axis as i64),
                    int_attr("largest", i64::from(*largest)),
                    int_attr("sorted", 1),
                ];
                self.fresh += 1;
                let (values, positions) = (format!("t{}v", self.fresh), format!("t{}", self.fresh));
                let mut node = node_proto("TopK", &[x[0], &k], &values, attrs);
                node.output.push(positions.clone());
                self.nodes.push(node);
                positions
            }
            Op::Fused(kernel) => {
                let mut values: Vec<String> = Vec::with_capacity(kernel.body.len());
                for instr in &kernel.body {
                    let v = match *instr {
                        Instr::Input(i) => x[i].to_string(),
                        Instr::Const(c) => self.scalar(c),
                        Instr::Unary(u, a) => {
                            let a = values[a].clone();
                            self.unary(u, &a)
                        }
                        Instr::Binary(b, p, q) => {
                            let (p, q) = (values[p].clone(), values[q].clone());
                            self.binary(b, &p, &q)
                        }
                    };
                    values.push(v);
                }
                let result = values.pop().ok_or_else(|| self.error(id, "the kernel has an empty body"))?;
                // Every operand is read broadcast to the output's shape: stretch the result
                // to it, as the kernel does.
                let mut full = self.graph.shape(node.inputs[0]).to_vec();
                for &i in &node.inputs[1..] {
                    full = ops::elementwise::broadcast_shapes(&full, self.graph.shape(i))
                        .map_err(|e| self.error(id, e))?;
                }
                let shape = self.shape_value(&full, id)?;
                let result = self.emit("Expand", &[&result, &shape], vec![]);
                match &kernel.reduce {
                    Some(r) => self.reduce(r.op, &r.axes, r.keep_dims, &result),
                    None => result,
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::graph::Init;

    fn sizes() -> Binding {
        Binding::from([("count(x)".to_string(), 3)])
    }

    #[test]
    fn a_graph_renders_with_a_named_batch_and_its_parameters_inside() {
        let mut g = Graph::new();
        let x = g.input("x", vec![Dim::batch(), Dim::sym("count(x)")], DType::F);
        let w = g.param("w", vec![Dim::sym("count(x)"), Dim::lit(2)], Init::Zeros, None, false);
        let y = g.add(Op::MatMul { trans_a: false, trans_b: false }, &[x, w], "y").unwrap();
        let flat = g.add(Op::Reshape { shape: vec![&Dim::batch() * &Dim::lit(2)] }, &[y], "flat").unwrap();
        g.outputs.insert("p".into(), flat);
        let params = HashMap::from([("w".to_string(), Tensor { shape: vec![3, 2], data: vec![0.5; 6] })]);
        let model = render(&g, &sizes(), &params, &ModelInfo::default()).unwrap();
        assert_eq!((model.ir_version, model.opset_import[0].version), (IR_VERSION, OPSET));
        let graph = model.graph.unwrap();
        let dims = |v: &proto::ValueInfoProto| {
            v.r#type.as_ref().unwrap().tensor_type.as_ref().unwrap().shape.as_ref().unwrap().dim.clone()
        };
        let input = dims(&graph.input[0]);
        assert_eq!(input[0].value, Some(proto::DimensionValue::DimParam("B".into())));
        assert_eq!(input[1].value, Some(proto::DimensionValue::DimValue(3)));
        assert_eq!(dims(&graph.output[0])[0].value, Some(proto::DimensionValue::DimParam("2*B".into())));
        assert_eq!(graph.initializer.iter().find(|t| t.name == "w").unwrap().dims, vec![3, 2]);
        // The reshape's target is computed from the batch: Shape of x, times 2.
        let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["MatMul", "Shape", "Mul", "Reshape", "Identity"]);
        let bytes = render(&g, &sizes(), &params, &ModelInfo::default()).unwrap().to_bytes();
        let back: proto::ModelProto = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(back.graph.unwrap().node.len(), 5);
    }

    #[test]
    fn an_op_without_an_evaluation_rendering_is_an_error_naming_it() {
        let mut g = Graph::new();
        let ids = g.input("ids", vec![Dim::batch()], DType::I);
        let dy = g.input("dy", vec![Dim::batch(), Dim::lit(4)], DType::F);
        let rows = g.add(Op::SparseRows { rows: Dim::lit(10) }, &[ids, dy], "emb/grad").unwrap();
        g.outputs.insert("g".into(), rows);
        let err = render(&g, &sizes(), &HashMap::new(), &ModelInfo::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot export op sparse_rows rows=10 (at `emb/grad` in the spec): it is a gradient op, which an \
             evaluation graph does not hold"
        );
    }

    #[test]
    fn a_missing_parameter_and_a_constant_sized_by_the_batch_are_errors() {
        let mut g = Graph::new();
        let w = g.param("w", vec![Dim::lit(2)], Init::Zeros, None, false);
        g.outputs.insert("w_out".into(), w);
        let err = render(&g, &sizes(), &HashMap::new(), &ModelInfo::default()).unwrap_err();
        assert_eq!(err.to_string(), "parameter `w` has no value in the checkpoint");
        let mut g = Graph::new();
        let r = g.add(Op::Arange { n: Dim::batch() }, &[], "pos").unwrap();
        g.outputs.insert("r".into(), r);
        let err = render(&g, &sizes(), &HashMap::new(), &ModelInfo::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot export op arange n=B (at `pos` in the spec): its size B depends on the batch"
        );
    }
}

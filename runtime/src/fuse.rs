//! Elementwise fusion: the pass that turns maximal groups of `Unary`/`Binary` nodes into
//! single [`Op::Fused`] nodes ([`fuse_elementwise`], [`fuse_with_map`]).
//!
//! Backends run it on the optimised forward + backward graph (after autodiff; a fused node
//! has no gradient rule). This module owns the grouping rules:
//! - a group is a set of elementwise nodes (dense, real) with one **root**, the node whose
//!   value leaves the group; every other member has all its users inside the group and is
//!   not a named graph output, so no value that anyone else reads disappears;
//! - operands of the group that are `Scalar` constants become kernel constants, and
//!   operands that are `Broadcast`s of a dense real value are read through (the kernel
//!   reads the smaller value broadcast, and the broadcast is not materialised when nobody
//!   else needs it);
//! - a member whose shape is smaller than the root's is recomputed for every output
//!   element, so only cheap ops ([`UnaryOp::is_cheap`], [`crate::ops::BinaryOp::is_cheap`]:
//!   no transcendental, no division) join a group across a broadcast;
//! - groups stop growing at [`MAX_KERNEL_OPS`] ops so that kernels stay small to compile;
//! - first, `step(x)` is made to read `relu(x)` when the graph has both (equal values), so
//!   that a relu layer's pre-activation `x` has one reader and fuses into the relu;
//! - then cheap values that several kernels would read are recomputed in each of them
//!   instead of stored ([`recompute_in_readers`]): each reader gets its own copy, which
//!   joins its group, so such a value is never written to memory and read back.
//!
//! Groups of one op are left alone (the backends have direct kernels for those) unless
//! an operand is broadcast (fused kernels read any broadcast pattern by strides; direct
//! kernels know a few) or the op is a transcendental ([`UnaryOp::is_transcendental`]:
//! fused kernels compute those with SIMD polynomials or device builtins, direct kernels
//! one element at a time). A `Reduce` sum or mean that is the only reader of a group's
//! root (which is then no output) becomes the kernel's epilogue ([`Reduction`]), so the
//! elementwise result is never stored; this holds for groups of one op too (the masked
//! pooling `sum(e * m, axis)`). The kernel itself ([`FusedKernel`]) and its rules live in
//! `ops/fused.rs`.

use crate::ir::graph::{Graph, NodeId};
use crate::ops::fused::{FusedKernel, Instr, Reduction};
use crate::ops::{DType, Op, Operand, ReduceOp, Signature, UnaryOp, ValueKind};
use crate::passes::retain;
use std::collections::HashMap;
use std::sync::Arc;

/// The most Unary/Binary ops one fused kernel holds.
pub const MAX_KERNEL_OPS: usize = 64;

/// A sum or mean that no elementwise group feeds (the pass leaves it an `Op::Reduce`) as a
/// fused kernel with an empty body: its reduction epilogue does the work, so a backend runs
/// it on its fused-kernel path (the jit's vector lanes and threads, an OpenCL kernel).
/// `None` for any other op. Its operand is a dense real value, as every reduction's is.
pub fn lone_reduction(op: &Op) -> Option<FusedKernel> {
    let Op::Reduce { op: r @ (ReduceOp::Sum | ReduceOp::Mean), axes, keep_dims } = op else { return None };
    let reduce = Some(Reduction { op: *r, axes: axes.clone(), keep_dims: *keep_dims });
    Some(FusedKernel { inputs: 1, body: vec![Instr::Input(0)], reduce })
}

/// The graph with its elementwise groups fused (see the module docs). Parameters, inputs
/// and named outputs are kept; node ids change.
pub fn fuse_elementwise(graph: &Graph) -> Graph {
    fuse_with_map(graph).0
}

/// [`fuse_elementwise`], also returning for each node of `graph` (by index) the node of the
/// fused graph that holds its value: the copy of the node, or the fused node it is the
/// root of; `None` for nodes absorbed into a kernel or no longer needed. (Groups are formed
/// on `graph` after [`step_reads_relu`], whose node ids are the same.)
pub fn fuse_with_map(graph: &Graph) -> (Graph, Vec<Option<NodeId>>) {
    // Node ids are the same in the rewired graph.
    let rewired = step_reads_relu(graph);
    let graph = rewired.as_ref().unwrap_or(graph);
    match recompute_in_readers(graph) {
        Some((copied, first)) => {
            let (fused, second) = fuse_groups(&copied);
            let map = first.into_iter().map(|m| m.and_then(|n| second[n.index()])).collect();
            (fused, map)
        }
        None => fuse_groups(graph),
    }
}

/// The grouping and kernel building of [`fuse_with_map`] on a graph whose recomputed values
/// already have one copy per reader.
fn fuse_groups(graph: &Graph) -> (Graph, Vec<Option<NodeId>>) {
    let groups = assign_groups(graph);
    let mut plans: HashMap<NodeId, Plan> = HashMap::new();
    let mut members: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for id in graph.ids() {
        if let Some(root) = groups[id.index()] {
            members.entry(root).or_default().push(id);
        }
    }
    // Plan every group; a group that does not pay (or whose kernel would lose the output
    // shape) is dissolved: its members are copied as they are. A plan is emitted at its
    // last node and replaces `plan.replaces` (in order, that node last).
    let mut absorbed = vec![false; graph.len()];
    for (&root, group) in &members {
        if let Some(plan) = plan_group(graph, group, None) {
            for &m in group {
                absorbed[m.index()] = m != root;
            }
            plans.insert(root, plan);
        }
    }
    // A sum or mean that is the only reader of a group's root takes the group in as its
    // epilogue: the elementwise result is never stored.
    for id in graph.ids() {
        let node = graph.node(id);
        let Op::Reduce { op: op @ (ReduceOp::Sum | ReduceOp::Mean), axes, keep_dims } = &node.op else { continue };
        let x = node.inputs[0];
        let Some(group) = members.get(&x) else { continue };
        if graph.outputs.values().any(|&o| o == x) || graph.users(x).any(|(u, _)| u != id) {
            continue;
        }
        let reduction = Reduction { op: *op, axes: axes.clone(), keep_dims: *keep_dims };
        if let Some(plan) = plan_group(graph, group, Some((id, reduction))) {
            plans.remove(&x);
            for &m in group {
                absorbed[m.index()] = true;
            }
            plans.insert(id, plan);
        }
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; graph.len()];
    for id in graph.ids() {
        if absorbed[id.index()] {
            continue;
        }
        if let Some(plan) = plans.remove(&id) {
            let operands: Option<Vec<NodeId>> = plan.operands.iter().map(|o| map[o.index()]).collect();
            let fused =
                operands.and_then(|ops| out.add(Op::Fused(Arc::new(plan.kernel)), &ops, &graph.node(id).scope).ok());
            match fused {
                Some(f) if out.sig(f) == graph.sig(id) => {
                    map[id.index()] = Some(f);
                    continue;
                }
                // Not reached (`plan_group` checks the same shape rule on the same
                // operands); should it be, the group's nodes are copied unfused instead.
                _ => {
                    for &m in &plan.replaces {
                        copy_node(graph, &mut out, &mut map, m);
                    }
                    continue;
                }
            }
        }
        copy_node(graph, &mut out, &mut map, id);
    }
    out.copy_tables(graph, &map);
    // Broadcasts and scalars read through by every user are dead now.
    let mut keep = vec![false; out.len()];
    for id in out.outputs.values() {
        keep[id.index()] = true;
    }
    for id in out.declared_nodes() {
        keep[id.index()] = true;
    }
    let (pruned, second) = retain(&out, &keep);
    let map = map.into_iter().map(|m| m.and_then(|n| second[n.index()])).collect();
    (pruned, map)
}

/// The graph with every `step(x)` reading `relu(x)` instead of `x` where the graph computes
/// `relu(x)` earlier (`None` when there is none). The values are equal (NaN included: both
/// give 0), and the backward pass of every relu layer has this shape: `x = a + bias` is then
/// read by the relu only, and fuses into it. Node ids do not change.
pub fn step_reads_relu(graph: &Graph) -> Option<Graph> {
    let mut relu_of: HashMap<NodeId, NodeId> = HashMap::new();
    let mut rewire: HashMap<NodeId, NodeId> = HashMap::new();
    for id in graph.ids() {
        let node = graph.node(id);
        match node.op {
            Op::Unary(UnaryOp::Relu) => {
                relu_of.entry(node.inputs[0]).or_insert(id);
            }
            Op::Unary(UnaryOp::Step) => {
                if let Some(&r) = relu_of.get(&node.inputs[0]) {
                    rewire.insert(id, r);
                }
            }
            _ => {}
        }
    }
    if rewire.is_empty() {
        return None;
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = Vec::with_capacity(graph.len());
    for id in graph.ids() {
        let node = graph.node(id);
        let inputs: Vec<NodeId> = match rewire.get(&id) {
            Some(&r) => vec![r],
            None => node.inputs.clone(),
        };
        let new_id = out.push_copy(node, inputs);
        debug_assert_eq!(new_id, id);
        map.push(Some(new_id));
    }
    out.copy_tables(graph, &map);
    Some(out)
}

/// The most ops that recomputing one value adds to each kernel reading it (its own op and
/// those of the recomputed values it reads in turn).
pub const MAX_RECOMPUTE_OPS: usize = 8;

/// Whether [`recompute_in_readers`] recomputes node `id` in each of its readers, given the
/// decisions for the nodes before it (`recomputed`, with each one's op count and the large
/// values it reads in the end): `Some((ops, sources))` when it does.
fn recompute_plan(
    graph: &Graph,
    id: NodeId,
    is_output: &[bool],
    constant: &[bool],
    recomputed: &[Option<(usize, Vec<NodeId>)>],
) -> Option<(usize, Vec<NodeId>)> {
    if !fusible(graph, id) || is_output[id.index()] {
        return None;
    }
    let node = graph.node(id);
    if matches!(node.op, Op::Unary(u) if u.is_transcendental()) {
        return None;
    }
    let shape = graph.shape(id);
    let mut readers: Vec<NodeId> = graph.users(id).map(|(u, _)| u).collect();
    readers.sort();
    readers.dedup();
    // Every reader must take the recomputation into its kernel: an elementwise op of the
    // same shape (no per-element recomputation of a smaller value), or a sum or mean (the
    // copy becomes the kernel of its epilogue).
    let takes = |u: NodeId| match &graph.node(u).op {
        Op::Unary(_) | Op::Binary(_) => fusible(graph, u) && graph.shape(u) == shape,
        Op::Reduce { op: ReduceOp::Sum | ReduceOp::Mean, .. } => true,
        _ => false,
    };
    if readers.len() < 2 || !readers.iter().all(|&u| takes(u)) {
        return None;
    }
    // A value made from constants alone leaves its readers' groups with no operand, and
    // such groups make no kernel: the copies would only compute it twice.
    if constant[id.index()] {
        return None;
    }
    let mut ops = 1;
    let mut sources: Vec<NodeId> = Vec::new();
    for &x in &node.inputs {
        let found = match &recomputed[x.index()] {
            Some((cost, from)) => {
                ops += cost;
                from.clone()
            }
            None if matches!(graph.node(x).op, Op::Scalar(_)) => Vec::new(),
            None => {
                let s = source_of(graph, x);
                if graph.shape(s) == shape {
                    vec![s]
                } else {
                    Vec::new()
                }
            }
        };
        for s in found {
            if !sources.contains(&s) {
                sources.push(s);
            }
        }
    }
    // Stored once, the value costs a write and a read per reader; recomputed, each reader
    // reads its large sources instead. One source always pays; two pay for two readers.
    let pays = sources.len() <= 1 || sources.len() == 2 && readers.len() <= 2;
    (pays && ops <= MAX_RECOMPUTE_OPS).then_some((ops, sources))
}

/// The graph with every cheap elementwise value that several kernels read recomputed in
/// each of them instead of stored once and read back: a copy of the node (and of the
/// recomputed values it reads) is placed before each reader, so every copy has one reader
/// and joins its group. Over large tensors a stored value costs a pass over memory (a
/// write, then a read per reader), while recomputing it costs a few vector instructions
/// per element: DIN's Dice reads `x - mean`, `1 - p` and the bias sum `x + b` from its
/// forward and backward kernels. A value is recomputed when it is not an output, not a
/// transcendental (those are costly enough to store: sigmoid, exp, ...), every reader is
/// an elementwise op of its shape or a sum or mean, its recomputation costs at most
/// [`MAX_RECOMPUTE_OPS`] ops, and it reads in the end at most one tensor of its own size
/// (or two, when it has two readers); see [`recompute_plan`]. The copies compute the same
/// ops on the same operands, so the values are the same bits. `None` when no value
/// qualifies; otherwise the new graph and the image of each node (`None` for the
/// recomputed ones).
pub fn recompute_in_readers(graph: &Graph) -> Option<(Graph, Vec<Option<NodeId>>)> {
    let mut is_output = vec![false; graph.len()];
    for id in graph.outputs.values() {
        is_output[id.index()] = true;
    }
    // Values computed from scalar constants alone (through elementwise ops and broadcasts).
    let mut constant = vec![false; graph.len()];
    for id in graph.ids() {
        let node = graph.node(id);
        constant[id.index()] = match node.op {
            Op::Scalar(_) => true,
            Op::Unary(_) | Op::Binary(_) | Op::Broadcast { .. } => node.inputs.iter().all(|x| constant[x.index()]),
            _ => false,
        };
    }
    let mut recomputed: Vec<Option<(usize, Vec<NodeId>)>> = vec![None; graph.len()];
    for id in graph.ids() {
        recomputed[id.index()] = recompute_plan(graph, id, &is_output, &constant, &recomputed);
    }
    if recomputed.iter().all(Option::is_none) {
        return None;
    }
    let mut out = Graph::new();
    let mut map: Vec<Option<NodeId>> = vec![None; graph.len()];
    for id in graph.ids() {
        if recomputed[id.index()].is_some() {
            continue;
        }
        let node = graph.node(id);
        let mut copies: HashMap<NodeId, NodeId> = HashMap::new();
        let inputs =
            node.inputs.iter().map(|&x| copy_for_reader(graph, &mut out, &map, &recomputed, &mut copies, x)).collect();
        map[id.index()] = Some(out.push_copy(node, inputs));
    }
    out.copy_tables(graph, &map);
    Some((out, map))
}

/// The node of `out` that a reader reads for `x`: its image, or for a recomputed value a new
/// copy (made once per reader, `copies`), reading in turn copies of the recomputed values
/// it reads.
fn copy_for_reader(
    graph: &Graph,
    out: &mut Graph,
    map: &[Option<NodeId>],
    recomputed: &[Option<(usize, Vec<NodeId>)>],
    copies: &mut HashMap<NodeId, NodeId>,
    x: NodeId,
) -> NodeId {
    if recomputed[x.index()].is_none() {
        return map[x.index()].expect("an operand precedes its reader and is not recomputed");
    }
    if let Some(&c) = copies.get(&x) {
        return c;
    }
    let node = graph.node(x);
    let inputs = node.inputs.iter().map(|&i| copy_for_reader(graph, out, map, recomputed, copies, i)).collect();
    let c = out.push_copy(node, inputs);
    copies.insert(x, c);
    c
}

/// Appends a copy of node `id` of `graph` to `out`, reading the images of its operands.
fn copy_node(graph: &Graph, out: &mut Graph, map: &mut [Option<NodeId>], id: NodeId) {
    let node = graph.node(id);
    // Every operand precedes its user and is either copied or the root of a kernel.
    let inputs = node.inputs.iter().filter_map(|i| map[i.index()]).collect();
    map[id.index()] = Some(out.push_copy(node, inputs));
}

/// Whether a node can be a member of a group.
fn fusible(graph: &Graph, id: NodeId) -> bool {
    let node = graph.node(id);
    matches!(node.op, Op::Unary(_) | Op::Binary(_)) && node.sig.dtype == DType::F && node.sig.kind == ValueKind::Dense
}

/// Ops worth recomputing per output element when their own value is smaller.
fn cheap(op: &Op) -> bool {
    match op {
        Op::Unary(u) => u.is_cheap(),
        Op::Binary(b) => b.is_cheap(),
        _ => false,
    }
}

/// The group root of every fusible node (`None` for the others). Nodes are visited from the
/// last to the first, so a node's users are placed before it: it joins their group when
/// all of them are in one group and it is not an output; otherwise it roots a new group.
fn assign_groups(graph: &Graph) -> Vec<Option<NodeId>> {
    let mut is_output = vec![false; graph.len()];
    for id in graph.outputs.values() {
        is_output[id.index()] = true;
    }
    let mut group: Vec<Option<NodeId>> = vec![None; graph.len()];
    let mut size: HashMap<NodeId, usize> = HashMap::new();
    for id in graph.ids().collect::<Vec<_>>().into_iter().rev() {
        if !fusible(graph, id) {
            continue;
        }
        let mut users = graph.users(id).map(|(u, _)| group[u.index()]);
        let first = users.next().flatten();
        let joined = match first {
            Some(root) if !is_output[id.index()] && users.all(|g| g == Some(root)) => {
                let fits = size[&root] < MAX_KERNEL_OPS;
                let same_shape = graph.shape(id) == graph.shape(root);
                (fits && (same_shape || cheap(&graph.node(id).op))).then_some(root)
            }
            _ => None,
        };
        let root = joined.unwrap_or(id);
        group[id.index()] = Some(root);
        *size.entry(root).or_insert(0) += 1;
    }
    group
}

/// A group ready to become one node.
struct Plan {
    kernel: FusedKernel,
    /// Nodes of the source graph the kernel reads, in operand order.
    operands: Vec<NodeId>,
    /// The nodes the kernel replaces, in order; the last one's value is the kernel's.
    replaces: Vec<NodeId>,
}

/// The kernel of a group (`members` in topological order, its root last), with the
/// reduction of node `reduce` as epilogue when given; `None` when it should stay unfused.
/// The elementwise part must compute exactly the root's shape (a broadcast read through
/// must not lose an axis, even one a reduction removes afterwards).
fn plan_group(graph: &Graph, members: &[NodeId], reduce: Option<(NodeId, Reduction)>) -> Option<Plan> {
    let root = *members.last()?;
    for read_through in [true, false] {
        let (mut plan, broadcasts_removed) = build_kernel(graph, members, read_through);
        let transcendental = plan.kernel.body.iter().any(|i| matches!(i, Instr::Unary(u, _) if u.is_transcendental()));
        let broadcasting = plan.operands.iter().any(|&o| graph.sig(o).shape != graph.sig(root).shape);
        let pays =
            reduce.is_some() || plan.kernel.op_count() >= 2 || broadcasts_removed > 0 || transcendental || broadcasting;
        if plan.kernel.inputs == 0 || !pays {
            return None;
        }
        let sigs: Vec<&Signature> = plan.operands.iter().map(|&o| graph.sig(o)).collect();
        let operands: Vec<Operand> =
            sigs.iter().map(|s| Operand { shape: &s.shape, dtype: s.dtype, kind: s.kind }).collect();
        let infers = |kernel: &FusedKernel, target: NodeId| {
            Op::Fused(Arc::new(kernel.clone())).infer(&operands).is_ok_and(|sig| &sig == graph.sig(target))
        };
        if !infers(&plan.kernel, root) {
            continue;
        }
        plan.replaces = members.to_vec();
        if let Some((at, reduction)) = &reduce {
            plan.kernel.reduce = Some(reduction.clone());
            plan.replaces.push(*at);
            if !infers(&plan.kernel, *at) {
                return None;
            }
        }
        return Some(plan);
    }
    None
}

/// The operand a member reads for `x`: through chains of broadcasts of dense reals.
fn source_of(graph: &Graph, mut x: NodeId) -> NodeId {
    loop {
        let node = graph.node(x);
        let real = node.sig.dtype == DType::F && node.sig.kind == ValueKind::Dense;
        match node.op {
            Op::Broadcast { .. } if real => x = node.inputs[0],
            _ => return x,
        }
    }
}

/// The kernel body of a group and how many broadcasts it reads through.
fn build_kernel(graph: &Graph, members: &[NodeId], read_through: bool) -> (Plan, usize) {
    let mut body: Vec<Instr> = Vec::new();
    let mut register: HashMap<NodeId, usize> = HashMap::new();
    let mut operands: Vec<NodeId> = Vec::new();
    let mut broadcasts_removed = 0;
    for &m in members {
        let node = graph.node(m);
        let mut args = Vec::with_capacity(node.inputs.len());
        for &x in &node.inputs {
            if let Some(&r) = register.get(&x) {
                args.push(r);
                continue;
            }
            let instr = match graph.node(x).op {
                Op::Scalar(c) => Instr::Const(c),
                _ => {
                    let src = if read_through { source_of(graph, x) } else { x };
                    if src != x {
                        broadcasts_removed += 1;
                    }
                    let k = operands.iter().position(|&o| o == src).unwrap_or_else(|| {
                        operands.push(src);
                        operands.len() - 1
                    });
                    Instr::Input(k)
                }
            };
            let r = body.iter().position(|i| *i == instr).unwrap_or_else(|| {
                body.push(instr);
                body.len() - 1
            });
            register.insert(x, r);
            args.push(r);
        }
        body.push(match node.op {
            Op::Unary(u) => Instr::Unary(u, args[0]),
            Op::Binary(b) => Instr::Binary(b, args[0], args[1]),
            _ => unreachable!("groups hold only elementwise nodes"),
        });
        register.insert(m, body.len() - 1);
    }
    (
        Plan { kernel: FusedKernel { inputs: operands.len(), body, reduce: None }, operands, replaces: Vec::new() },
        broadcasts_removed,
    )
}

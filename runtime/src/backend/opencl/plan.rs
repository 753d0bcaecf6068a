//! The placement plan: a graph as the backend runs it. This module owns [`Plan`] (the
//! fused graph, its one OpenCL program, and per node whether a device kernel computes it,
//! whether its value stays on the device, and whether device kernels read it),
//! [`OpenCl::plan`] that makes and caches it per graph, and the program cache
//! ([`OpenCl::build_program`]).
//!
//! On the device run every `Op::Fused` kernel (rendered from the same [`FusedKernel`] the
//! jit compiles), lone sums and means (as fused kernels), `MatMul`, row gathers, layout
//! ops, softmax over any axis and, when enabled, the row-sparse gradients of embedding
//! tables (`SparseRows`). Every other op runs on the host through its eval rule, so the
//! backend is complete by construction and agrees with interp.

use super::{render, OpenCl};
use crate::backend::driver::Lifetimes;
use crate::backend::ExecError;
use crate::fuse::lone_reduction;
use crate::ir::graph::Graph;
use crate::ops::fused::FusedKernel;
use crate::ops::{DType, Op, ValueKind};
use ocl::Program;
use std::collections::HashMap;

/// A graph as the backend runs it: the fused graph, the name of each distinct fused
/// kernel in the plan's program, the program's source, and the parameters some device
/// kernel reads.
pub(super) struct Plan {
    pub(super) fused: Graph,
    pub(super) kernels: HashMap<FusedKernel, String>,
    pub(super) program_source: String,
    pub(super) device_params: Vec<String>,
    /// The value lifetimes of `fused`, computed once.
    pub(super) lifetimes: Lifetimes,
    /// Per node: a device kernel computes it (a fused kernel or a MatMul), unless its
    /// shapes make it fall back to the host at run time.
    pub(super) on_device: Vec<bool>,
    /// Per node: computed on the device, not kept, and read only by device kernels: its
    /// value stays in device memory and is never read back ([`DeviceEval`]).
    pub(super) device_only: Vec<bool>,
    /// Per node: some device kernel reads it (its device buffer is kept for them).
    pub(super) device_read: Vec<bool>,
    /// Per node: another node of `fused` reads it.
    pub(super) read_by_node: Vec<bool>,
}

/// Which nodes of `fused` run on the device, which stay there, and which device kernels
/// read (see [`Plan`]).
fn placement(
    fused: &Graph,
    kernels: &HashMap<FusedKernel, String>,
    lifetimes: &Lifetimes,
    sparse_rows: bool,
) -> (Vec<bool>, Vec<bool>, Vec<bool>) {
    let n = fused.len();
    let on_device: Vec<bool> = fused
        .ids()
        .map(|id| {
            let node = fused.node(id);
            let real = node.sig.dtype == DType::F && node.sig.kind == ValueKind::Dense;
            match &node.op {
                Op::Fused(k) => kernels.contains_key(k.as_ref()),
                op @ Op::Reduce { .. } => lone_reduction(op).is_some_and(|k| kernels.contains_key(&k)),
                Op::MatMul { .. } => true,
                Op::SparseRows { .. } => sparse_rows && node.sig.dtype == DType::F,
                op => real && (matches!(op, Op::Gather | Op::Softmax { .. }) || is_layout(op)),
            }
        })
        .collect();
    let (mut host_read, mut device_read) = (vec![false; n], vec![false; n]);
    for id in fused.ids() {
        for &i in &fused.node(id).inputs {
            if on_device[id.index()] {
                device_read[i.index()] = true;
            } else {
                host_read[i.index()] = true;
            }
        }
    }
    let device_only = fused
        .ids()
        .map(|id| {
            let i = id.index();
            on_device[i] && device_read[i] && !host_read[i] && !lifetimes.keeps(id)
        })
        .collect();
    (on_device, device_only, device_read)
}

impl OpenCl {
    /// Puts the plan of `graph` first in `plans`, making it (and building its program) on
    /// first sight.
    pub(super) fn plan(&mut self, graph: &Graph) -> Result<(), ExecError> {
        if self.plans.promote(graph) {
            return Ok(());
        }
        let fused = crate::fuse::fuse_elementwise(graph);
        let mut order: Vec<FusedKernel> = Vec::new();
        let mut kernels: HashMap<FusedKernel, String> = HashMap::new();
        for id in fused.ids() {
            let node = fused.node(id);
            let kernel = match &node.op {
                Op::Fused(k) => Some(k.as_ref().clone()),
                op => lone_reduction(op),
            };
            if let Some(k) = kernel {
                if !kernels.contains_key(&k) {
                    kernels.insert(k.clone(), render::fused_name(order.len()));
                    order.push(k);
                }
            }
        }
        let program_source = render::program(&order.iter().collect::<Vec<_>>(), self.max_work_group);
        self.build_program(&program_source)?;
        let lifetimes = Lifetimes::new(&fused, false);
        let (on_device, device_only, device_read) = placement(&fused, &kernels, &lifetimes, self.sparse_rows_on_device);
        let mut device_params: Vec<String> = Vec::new();
        for id in fused.ids().filter(|id| on_device[id.index()]) {
            for &i in &fused.node(id).inputs {
                if let Op::Param { name } = &fused.node(i).op {
                    if !device_params.contains(name) {
                        device_params.push(name.clone());
                    }
                }
            }
        }
        let mut read_by_node = vec![false; fused.len()];
        for id in fused.ids() {
            for &i in &fused.node(id).inputs {
                read_by_node[i.index()] = true;
            }
        }
        self.plans.insert(
            graph,
            Plan {
                fused,
                kernels,
                program_source,
                device_params,
                lifetimes,
                on_device,
                device_only,
                device_read,
                read_by_node,
            },
        );
        Ok(())
    }

    /// Builds OpenCL C `source` for this executor's device unless a program with that text
    /// was built already; a build error shows the build log with the source lines it names.
    pub fn build_program(&mut self, source: &str) -> Result<(), ExecError> {
        if self.programs.contains_key(source) {
            return Ok(());
        }
        let program =
            Program::builder().src(format!("#line 1\n{source}")).devices(self.device).build(&self.context).map_err(
                |e| {
                    let log = e.to_string();
                    ExecError::BadOperand {
                        op: "opencl program".into(),
                        message: format!(
                            "the kernels did not build on {}:\n{}",
                            self.summary.name,
                            render::annotate_build_log(&log, source)
                        ),
                    }
                },
            )?;
        self.programs.insert(source.to_string(), program);
        Ok(())
    }
}

/// Whether `op` is a layout op the device runs as copies ([`DeviceEval::layout`]).
pub(super) fn is_layout(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Broadcast { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Pad { .. }
    )
}

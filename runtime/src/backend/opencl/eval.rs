//! The evaluator: how the driver's nodes run on this backend ([`DeviceEval`]), device
//! kernels where the plan places them, the eval rules on the host otherwise, with
//! per-op times when profiling.
//!
//! **Values between device kernels stay on the device.** A device result read only by
//! device kernels is never read back; one the host also reads is read back once, and its
//! buffer still serves the device readers. Row-sparse gradients of embedding tables are
//! combined on the device, each row summed by one work item per element in the host's
//! order (the host groups the ids by row), so the result is deterministic and equal to the
//! host's combine.

use super::launch::{Arg, DeviceRun};
use super::plan::{is_layout, Plan};
use super::{cl_err, train};
use crate::backend::driver::{Evaluator, Operands};
use crate::backend::{profile_key, ExecError, OpProfile};
use crate::exec::EvalCx;
use crate::fuse::lone_reduction;
use crate::ir::graph::NodeId;
use crate::ops::{self, Op};
use crate::rows::RowGroups;
use crate::tensor::{broadcast_strides, strides, Tensor, Value};
use ocl::Buffer;
use std::collections::HashMap;
use std::time::Instant;

/// The backend's evaluator for the interp driver: device kernels where they apply, the
/// eval rules otherwise; per-kind times when profiling.
///
/// **Values between device kernels stay on the device.** Each device result's buffer is
/// kept, by node, while device kernels still read it, so a device reader never uploads a
/// value the device computed. A `device_only` value ([`Plan`]) is not read back at all:
/// the driver gets an empty stand-in ([`Evaluator::deferred`]); should a reader fall back
/// to the host after all (a shape its kernel does not take), the value is read back for
/// it then. Buffers are dropped at their value's last reader. The gradients a training
/// step keeps on the device (`stay`) are stand-ins too, their buffers handed to the step
/// ([`train::DeviceGrad`]).
pub(super) struct DeviceEval<'a> {
    pub(super) dev: DeviceRun<'a>,
    pub(super) plan: &'a Plan,
    /// Device buffers of computed values that device kernels still read, by node.
    pub(super) resident: HashMap<NodeId, Buffer<f32>>,
    /// Host values (feeds, host results) uploaded for a device reader in this run, by
    /// node, so that their other device readers do not upload them again; dropped at the
    /// value's last reader. Ids apart.
    pub(super) uploaded: std::cell::RefCell<HashMap<NodeId, Buffer<f32>>>,
    pub(super) uploaded_ids: std::cell::RefCell<HashMap<NodeId, Buffer<u32>>>,
    pub(super) profile: Option<&'a mut OpProfile>,
    /// Values read back in this run.
    pub(super) read_back: std::cell::Cell<u64>,
    /// Per node: an output to keep on the device when a device kernel computes it (the
    /// gradients of a device training step; unread by other nodes).
    pub(super) stay: Option<&'a [bool]>,
    /// The device values of the `stay` outputs, by node.
    pub(super) stayed: HashMap<NodeId, train::DeviceGrad>,
}

impl DeviceEval<'_> {
    /// The device buffer of operand `k` (node `input`, host value `t`): the value's own
    /// buffer when the device computed it, else the resident parameter or an upload.
    fn buffer(&self, input: NodeId, t: &Tensor<f32>) -> Result<Buffer<f32>, ExecError> {
        if let Some(b) = self.resident.get(&input).cloned().or_else(|| self.dev.param(t)) {
            return Ok(b);
        }
        if let Some(b) = self.uploaded.borrow().get(&input) {
            return Ok(b.clone());
        }
        let b = self.dev.link.upload(&t.data, "an operand")?;
        self.uploaded.borrow_mut().insert(input, b.clone());
        Ok(b)
    }

    /// The device buffer of the ids of node `input`: uploaded by its first device reader
    /// in this run, kept for the others.
    fn ids_buffer(&self, input: NodeId, ids: &[u32]) -> Result<Buffer<u32>, ExecError> {
        if let Some(b) = self.uploaded_ids.borrow().get(&input) {
            return Ok(b.clone());
        }
        let b = self.dev.link.upload(ids, "ids")?;
        self.uploaded_ids.borrow_mut().insert(input, b.clone());
        Ok(b)
    }

    /// A row-sparse gradient `SparseRows(ids, values)` combined on the device
    /// ([`DeviceEval::combine_rows`]) and read back: distinct ascending rows, each the sum
    /// of its entries in their original order, bit for bit what the host's combine gives.
    /// `None` (the eval rule on the host) where `combine_rows` declines.
    fn sparse_rows(
        &self,
        id: NodeId,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<Value<f32>>, ExecError> {
        let Some(train::DeviceGrad::Rows { rows, values, width }) = self.combine_rows(id, args, cx)? else {
            return Ok(None);
        };
        let data = self.dev.link.read(&values, rows.len() * width)?;
        self.read_back.set(self.read_back.get() + 1);
        let mut value_shape = vec![rows.len()];
        value_shape.extend_from_slice(&cx.out_shape[1..]);
        Ok(Some(Value::RowSparse { shape: cx.out_shape.to_vec(), rows, values: Tensor { shape: value_shape, data } }))
    }

    /// The entries of `SparseRows(ids, values)` summed per row on the device, left there:
    /// the host groups the ids by row ([`RowGroups`]: it has them, a feed or a host value)
    /// and uploads the grouping; `mdl_sum_rows` adds each row's entries in their original
    /// order starting from zero, as `Value::to_dense` does, so the result is deterministic
    /// and equal to the host's combine. `None` (the eval rule on the host) for an id
    /// outside the table, which then fails as interp does, and for sizes beyond `int`.
    fn combine_rows(
        &self,
        id: NodeId,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<train::DeviceGrad>, ExecError> {
        let (ids, values) = (args[0].ids("sparse_rows")?, args[1].dense("sparse_rows")?);
        let (limit, width) = (cx.out_shape[0], cx.out_shape[1..].iter().product::<usize>());
        let total = ids.data.len() * width;
        if width == 0
            || ids.data.is_empty()
            || values.shape.iter().product::<usize>() != total
            || i32::try_from(total).is_err()
            || ids.data.iter().any(|&r| r as usize >= limit)
        {
            return Ok(None);
        }
        let groups = RowGroups::of(&ids.data);
        let values = self.buffer(self.plan.fused.node(id).inputs[1], values)?;
        let order = self.dev.link.upload(&groups.order, "the order of a gradient's entries")?;
        let starts = self.dev.link.upload(&groups.starts, "the rows of a gradient's entries")?;
        let combined = groups.rows.len() * width;
        let out = self.dev.link.output(combined)?;
        let args = [
            Arg::Floats(&out),
            Arg::Floats(&values),
            Arg::Uints(&order),
            Arg::Uints(&starts),
            Arg::Int(width as i32),
            Arg::Int(combined as i32),
        ];
        // SAFETY: `order` holds positions of entries (below `ids.len()`, so each entry's
        // `width` values lie in `values`, which holds `total`), `starts` has one more element
        // than there are rows, and work item `i < combined` writes `out[i]`.
        unsafe { self.dev.link.launch("mdl_sum_rows", combined, None, &args) }?;
        Ok(Some(train::DeviceGrad::Rows { rows: groups.rows, values: out, width }))
    }

    /// After node `id` (its value `out`, computed on the device or not): drops the device
    /// buffers of operands it was the last reader of, and records its time when profiling.
    fn finish(
        &mut self,
        id: NodeId,
        out: Value<f32>,
        device: bool,
        start: Option<Instant>,
        op: &Op,
    ) -> Result<Value<f32>, ExecError> {
        let inputs = &self.plan.fused.node(id).inputs;
        for (&i, &dies) in inputs.iter().zip(self.plan.lifetimes.dying(id)) {
            if dies {
                self.resident.remove(&i);
                self.uploaded.get_mut().remove(&i);
                self.uploaded_ids.get_mut().remove(&i);
            }
        }
        if let (Some(t), Some(profile)) = (start, self.profile.as_deref_mut()) {
            if device {
                // Kernels run asynchronously: wait, so the time is this kernel's.
                self.dev.link.queue.finish().map_err(|e| cl_err("waiting for the device", e))?;
            }
            profile.record_node(profile_key(op, !device), &self.plan.fused, id, t.elapsed());
        }
        Ok(out)
    }

    /// Runs `op` on the device when it has a kernel for it; `None` otherwise.
    fn on_device(
        &self,
        id: NodeId,
        op: &Op,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        if !self.plan.on_device[id.index()] {
            return Ok(None);
        }
        let out_shape = cx.out_shape;
        let inputs = &self.plan.fused.node(id).inputs;
        if let Op::Gather = op {
            let (table, ids) = (args[0].dense("gather")?, args[1].ids("gather")?);
            let width = table.shape[1..].iter().product();
            let t = self.buffer(inputs[0], table)?;
            let id_buf = self.ids_buffer(inputs[1], &ids.data)?;
            return self.dev.gather(&t, table.shape[0], width, &ids.data, &id_buf);
        }
        let xs: Vec<&Tensor<f32>> = args.iter().map(|a| a.dense(&op.name())).collect::<Result<_, _>>()?;
        if is_layout(op) {
            let bufs: Vec<Buffer<f32>> =
                inputs.iter().zip(&xs).map(|(&i, x)| self.buffer(i, x)).collect::<Result<_, _>>()?;
            return self.layout(op, &xs, &bufs, cx);
        }
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.shape.as_slice()).collect();
        let bufs: Vec<Buffer<f32>> =
            inputs.iter().zip(&xs).map(|(&i, x)| self.buffer(i, x)).collect::<Result<_, _>>()?;
        match op {
            Op::Fused(kernel) => self.dev.fused(kernel, &shapes, &bufs, out_shape),
            Op::Reduce { .. } => match lone_reduction(op) {
                Some(kernel) => self.dev.fused(&kernel, &shapes, &bufs, out_shape),
                None => Ok(None),
            },
            Op::MatMul { trans_a, trans_b } => {
                self.dev.matmul(shapes[0], shapes[1], &bufs[0], &bufs[1], *trans_a, *trans_b, out_shape)
            }
            Op::Softmax { axis } => self.dev.softmax(&bufs[0], shapes[0], *axis),
            _ => Ok(None),
        }
    }

    /// A layout op as copies between views of the operands' buffers (a reshape is the
    /// operand's own buffer); `None` for what the copy kernel does not take.
    fn layout(
        &self,
        op: &Op,
        xs: &[&Tensor<f32>],
        bufs: &[Buffer<f32>],
        cx: &EvalCx,
    ) -> Result<Option<Buffer<f32>>, ExecError> {
        let out_shape = cx.out_shape;
        let total: usize = out_shape.iter().product();
        if total == 0 || xs.iter().any(|x| x.shape.iter().product::<usize>() == 0) {
            return Ok(None);
        }
        if let Op::Reshape { .. } = op {
            return Ok(Some(bufs[0].clone()));
        }
        let out = self.dev.link.output(total)?;
        let out_strides = strides(out_shape);
        let x_strides = strides(&xs[0].shape);
        let done = match op {
            Op::Permute { perm } => {
                let in_strides: Vec<usize> = perm.iter().map(|&p| x_strides[p]).collect();
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (0, &in_strides))?
            }
            Op::Broadcast { .. } => {
                let in_strides = broadcast_strides(&xs[0].shape, out_shape);
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (0, &in_strides))?
            }
            Op::Slice { axis, start, .. } => {
                let start = cx.size(start)?;
                if start + out_shape[*axis] > xs[0].shape[*axis] {
                    return Ok(None);
                }
                self.dev.copy(out_shape, &out, (0, &out_strides), &bufs[0], (start * x_strides[*axis], &x_strides))?
            }
            Op::Pad { axis, before, .. } => {
                let before = cx.size(before)?;
                out.cmd().fill(0.0f32, None).enq().map_err(|e| cl_err("zeroing a pad", e))?;
                self.dev.copy(
                    &xs[0].shape,
                    &out,
                    (before * out_strides[*axis], &out_strides),
                    &bufs[0],
                    (0, &x_strides),
                )?
            }
            Op::Concat { axis } => {
                let mut at = 0usize;
                let mut all = Some(());
                for (x, b) in xs.iter().zip(bufs) {
                    let done = self.dev.copy(
                        &x.shape,
                        &out,
                        (at * out_strides[*axis], &out_strides),
                        b,
                        (0, &strides(&x.shape)),
                    )?;
                    all = all.and(done);
                    at += x.shape[*axis];
                }
                all
            }
            _ => None,
        };
        Ok(done.map(|()| out))
    }

    /// `op` on the host by its eval rule, reading back the operands that stayed on the
    /// device, and the parameters whose device copy is ahead of the host's (updated by a
    /// device training step).
    fn on_host(
        &self,
        id: NodeId,
        op: &Op,
        args: &[crate::exec::Arg<'_, f32>],
        cx: &EvalCx,
    ) -> Result<Value<f32>, ExecError> {
        let inputs = &self.plan.fused.node(id).inputs;
        let stayed = |i: NodeId| self.plan.device_only[i.index()] && self.resident.contains_key(&i);
        let ahead = |a: &crate::exec::Arg<'_, f32>| match a {
            crate::exec::Arg::Param(t) => self.dev.param_entry(t).filter(|p| p.ahead).map(|p| &p.buffer),
            _ => None,
        };
        if !inputs.iter().zip(args).any(|(&i, a)| stayed(i) || ahead(a).is_some()) {
            return ops::eval(op, args, cx);
        }
        let mut read: Vec<Option<Tensor<f32>>> = Vec::with_capacity(inputs.len());
        for (&i, a) in inputs.iter().zip(args) {
            let device_copy = match (stayed(i), a) {
                (true, crate::exec::Arg::Value(Value::Dense(t))) => Some((t, &self.resident[&i])),
                (false, crate::exec::Arg::Param(t)) => ahead(a).map(|b| (*t, b)),
                _ => None,
            };
            read.push(match device_copy {
                Some((t, buffer)) => {
                    let len = t.shape.iter().product();
                    self.read_back.set(self.read_back.get() + 1);
                    Some(Tensor { shape: t.shape.clone(), data: self.dev.link.read(buffer, len)? })
                }
                None => None,
            });
        }
        let args: Vec<crate::exec::Arg<'_, f32>> =
            args.iter().zip(&read).map(|(a, r)| r.as_ref().map_or(*a, crate::exec::Arg::Param)).collect();
        ops::eval(op, &args, cx)
    }
}

impl Evaluator<f32> for DeviceEval<'_> {
    fn eval(
        &mut self,
        id: NodeId,
        op: &Op,
        operands: &mut Operands<'_, '_, f32>,
        cx: &EvalCx,
    ) -> Result<Value<f32>, ExecError> {
        let start = self.profile.is_some().then(Instant::now);
        let args = operands.args(op)?;
        let stays = self.stay.is_some_and(|s| s[id.index()]);
        if let (Op::SparseRows { .. }, true, true) = (op, self.plan.on_device[id.index()], stays) {
            if let Some(grad) = self.combine_rows(id, &args, cx)? {
                self.stayed.insert(id, grad);
                let mut value_shape = vec![0];
                value_shape.extend_from_slice(&cx.out_shape[1..]);
                let stand_in = Value::RowSparse {
                    shape: cx.out_shape.to_vec(),
                    rows: Vec::new(),
                    values: Tensor { shape: value_shape, data: Vec::new() },
                };
                return self.finish(id, stand_in, true, start, op);
            }
        }
        if let (Op::SparseRows { .. }, true) = (op, self.plan.on_device[id.index()]) {
            let rows = self.sparse_rows(id, &args, cx)?;
            let device = rows.is_some();
            let out = match rows {
                Some(v) => v,
                None => self.on_host(id, op, &args, cx)?,
            };
            return self.finish(id, out, device, start, op);
        }
        let buffer = self.on_device(id, op, &args, cx)?;
        let device = buffer.is_some();
        let out = match buffer {
            Some(b) if stays => {
                self.stayed.insert(id, train::DeviceGrad::Dense(b));
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: Vec::new() })
            }
            Some(b) if self.plan.device_only[id.index()] => {
                self.resident.insert(id, b);
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data: Vec::new() })
            }
            Some(b) => {
                let data = self.dev.link.read(&b, cx.out_shape.iter().product())?;
                self.read_back.set(self.read_back.get() + 1);
                if self.plan.device_read[id.index()] {
                    self.resident.insert(id, b);
                }
                Value::Dense(Tensor { shape: cx.out_shape.to_vec(), data })
            }
            None => self.on_host(id, op, &args, cx)?,
        };
        self.finish(id, out, device, start, op)
    }

    fn deferred(&self, id: NodeId) -> bool {
        (self.plan.device_only[id.index()] && self.resident.contains_key(&id)) || self.stayed.contains_key(&id)
    }
}

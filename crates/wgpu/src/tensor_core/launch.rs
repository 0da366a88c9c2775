//! Host side of the tensor-core kernels: grid, comptime configuration and launches.

use cubecl::client::Client;
use cubecl::ir::ElemType;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::device_layout::DeviceLayout;
use sparse_attn_kernel_types::AttentionShape;

use crate::args::{ProblemArgsLaunch, problem_args};
use crate::launch::{DeviceOptions, arg, grid_count, launch_kernel, tensor};
use crate::tensor_core::backward::{tc_dkdv_kernel, tc_dq_kernel};
use crate::tensor_core::forward::tc_forward_kernel;
use crate::tensor_core::stage::TensorCoreConfig;
use crate::tensor_core::{FRAG, TensorCorePlan};

/// Largest head dim whose `dK` and `dV` are computed in one launch.
const FUSED_DKDV_MAX_HEAD_DIM: usize = 64;

/// Largest rise of a row's maximum that the forward absorbs without rescaling its
/// accumulators: the unnormalised probabilities then reach `exp(slack)` (times the dropout
/// factor), kept below the 16-bit dtype's largest value with room to spare; at most 8
/// (probabilities below 2981, every one still with the dtype's full relative precision).
fn rescale_slack(half_max: f32, keep_scale: f32) -> f32 {
    (half_max / 16.0 / keep_scale.max(1.0)).ln().clamp(0.0, 8.0)
}

/// The largest finite value of the 16-bit `dtype` (f16 unless bf16).
fn largest_value(dtype: ElemType) -> f32 {
    match dtype {
        ElemType::Float(cubecl::ir::FloatKind::BF16) => 3.389_531_4e38,
        _ => 65_504.0,
    }
}

/// One launch's grid and configuration.
struct TensorCoreGrid {
    count: CubeCount,
    dim: CubeDim,
    tasks: usize,
    config: TensorCoreConfig,
}

impl TensorCoreGrid {
    /// The grid over `heads` heads of each batch row with `tile` rows per staged tile.
    fn new(
        client: &Client,
        plan: &TensorCorePlan,
        shape: &AttentionShape,
        layout: &DeviceLayout,
        opts: &DeviceOptions,
        heads: usize,
        tile: usize,
    ) -> Self {
        let tasks = shape.batch * heads * layout.n_blocks;
        let lanes = [8, 4, 2, 1]
            .into_iter()
            .find(|l| shape.head_dim.is_multiple_of(*l))
            .unwrap_or(1);
        Self {
            count: grid_count(client, tasks),
            dim: CubeDim::new_2d(plan.plane as u32, (layout.block / FRAG) as u32),
            tasks,
            config: TensorCoreConfig {
                block: layout.block,
                head_dim: shape.head_dim,
                tile,
                plane: plan.plane,
                lanes,
                mask_words: 2 * layout.mask_words.max(1),
                permuted: layout.permuted,
                padded: opts.padded,
                dropout: opts.dropout,
                softcap: opts.softcap_on,
                alibi: opts.alibi,
                relative: opts.relative,
                bias_grad: false,
                buckets: opts.buckets,
                with_dk: true,
                with_dv: true,
            },
        }
    }

    fn args(
        &self,
        shape: &AttentionShape,
        layout: &DeviceLayout,
        scale: f32,
        opts: &DeviceOptions,
        dtype: ElemType,
    ) -> ProblemArgsLaunch {
        let slack = rescale_slack(largest_value(dtype), opts.keep_scale);
        problem_args(shape, layout, self.tasks, scale, opts, slack)
    }
}

/// Tensor-core forward; the contract of [`crate::forward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    client: &Client,
    plan: &TensorCorePlan,
    dtype: ElemType,
    shape: AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    opts: &DeviceOptions,
    [q, k, v, out, lse]: [&Handle; 5],
) {
    let grid = TensorCoreGrid::new(
        client,
        plan,
        &shape,
        layout,
        opts,
        shape.heads,
        plan.forward_tile,
    );
    let lanes = grid.config.lanes;
    let (numel, kv_numel, rows) = (shape.numel(), shape.kv_numel(), shape.rows());
    launch_kernel!(tc_forward_kernel(
        client,
        grid.count.clone(),
        grid.dim,
        lanes,
        tensor(q, numel / lanes),
        tensor(k, kv_numel / lanes),
        tensor(v, kv_numel / lanes),
        tensor(out, numel),
        tensor(lse, rows),
        arg(&layout.row_ptr),
        arg(&layout.cols),
        arg(&layout.masks),
        arg(&layout.mask_bits),
        arg(&layout.order),
        arg(&opts.lengths),
        arg(&opts.slopes),
        grid.args(&shape, layout, scale, opts, dtype),
        grid.config,
        dtype,
    ));
}

/// Tensor-core backward; the contract of [`crate::backward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    client: &Client,
    plan: &TensorCorePlan,
    dtype: ElemType,
    shape: AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    opts: &DeviceOptions,
    [q, k, v, out, lse, dout]: [&Handle; 6],
    [dq, dk, dv]: [&Handle; 3],
    bias_sums: Option<&(Handle, usize)>,
) {
    let mut grid = TensorCoreGrid::new(
        client,
        plan,
        &shape,
        layout,
        opts,
        shape.heads,
        plan.dq_tile,
    );
    grid.config.bias_grad = bias_sums.is_some();
    let lanes = grid.config.lanes;
    let (numel, kv_numel, rows) = (shape.numel(), shape.kv_numel(), shape.rows());
    let delta = (client.empty(rows * size_of::<f32>()), rows);
    // A one-element stand-in where no bias gradient is summed.
    let none = (client.empty(size_of::<f32>()), 1);

    launch_kernel!(tc_dq_kernel(
        client,
        grid.count.clone(),
        grid.dim,
        lanes,
        tensor(q, numel / lanes),
        tensor(k, kv_numel / lanes),
        tensor(v, kv_numel / lanes),
        tensor(out, numel / lanes),
        tensor(lse, rows),
        tensor(dout, numel / lanes),
        tensor(dq, numel),
        arg(&delta),
        arg(&layout.row_ptr),
        arg(&layout.cols),
        arg(&layout.masks),
        arg(&layout.mask_bits),
        arg(&layout.order),
        arg(&opts.lengths),
        arg(&opts.slopes),
        arg(bias_sums.unwrap_or(&none)),
        grid.args(&shape, layout, scale, opts, dtype),
        grid.config,
        dtype,
    ));

    let kv_grid = TensorCoreGrid::new(
        client,
        plan,
        &shape,
        layout,
        opts,
        shape.kv_heads,
        plan.dkdv_tile,
    );
    let passes: &[(bool, bool)] = if shape.head_dim <= FUSED_DKDV_MAX_HEAD_DIM {
        &[(true, true)]
    } else {
        &[(false, true), (true, false)]
    };
    for &(with_dk, with_dv) in passes {
        let config = TensorCoreConfig {
            with_dk,
            with_dv,
            ..kv_grid.config
        };
        launch_kernel!(tc_dkdv_kernel(
            client,
            kv_grid.count.clone(),
            kv_grid.dim,
            lanes,
            tensor(q, numel / lanes),
            tensor(k, kv_numel / lanes),
            tensor(v, kv_numel / lanes),
            tensor(lse, rows),
            tensor(dout, numel / lanes),
            arg(&delta),
            tensor(dk, kv_numel),
            tensor(dv, kv_numel),
            arg(&layout.col_ptr),
            arg(&layout.t_rows),
            arg(&layout.t_entries),
            arg(&layout.masks),
            arg(&layout.mask_bits),
            arg(&layout.order),
            arg(&opts.lengths),
            arg(&opts.slopes),
            kv_grid.args(&shape, layout, scale, opts, dtype),
            config,
            dtype,
        ));
    }
}

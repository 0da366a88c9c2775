//! Host side: the checks of every buffer against the shape,
//! grid sizes and kernel launches.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use cubecl::client::Client;
use cubecl::ir::ElemType;
use cubecl::prelude::*;
use cubecl::server::Handle;
use sparse_attn_kernel_types::{AttentionShape, KernelOptions, RelativeBias, ScoreMods};

use crate::args::{FmaConfig, problem_args};
use crate::backward::{bias_sum_kernel, dkdv_kernel, dq_kernel};
use crate::device_layout::{DeviceLayout, upload};
use crate::error::KernelError;
use crate::forward::forward_kernel;
use crate::plan::TilePlan;
use crate::tensor_core::{self, TensorCorePlan};

/// Which kernels ran a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPath {
    /// The tensor-core kernels (cooperative matrices, f16/bf16 inputs).
    TensorCore,
    /// The FMA kernels (every dtype and device).
    Fma,
}

/// Passes run by each kernel family since the process started, forward and backward
/// counted separately: tests on a GPU read them to show which kernels served their cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LaunchCounts {
    /// Passes on the tensor-core kernels.
    pub tensor_core: usize,
    /// Passes on the FMA kernels.
    pub fma: usize,
}

static TENSOR_CORE_PASSES: AtomicUsize = AtomicUsize::new(0);
static FMA_PASSES: AtomicUsize = AtomicUsize::new(0);

impl KernelPath {
    fn counted(self) -> Self {
        let counter = match self {
            Self::TensorCore => &TENSOR_CORE_PASSES,
            Self::Fma => &FMA_PASSES,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self
    }
}

/// The passes run so far by each kernel family.
pub fn launch_counts() -> LaunchCounts {
    LaunchCounts {
        tensor_core: TENSOR_CORE_PASSES.load(Ordering::Relaxed),
        fma: FMA_PASSES.load(Ordering::Relaxed),
    }
}

/// The per-call options on the device: the lengths buffer (one element when unpadded), the
/// score modifiers' buffer ([`mods_buffer`]) and the dropout scalars (zeros without
/// dropout).
pub(crate) struct DeviceOptions {
    pub lengths: (Handle, usize),
    /// The score modifiers' buffer: ALiBi slopes per query head (zeros without ALiBi), then
    /// the relative-position bias's reach, bucket count, bucket map and table.
    pub slopes: (Handle, usize),
    pub padded: bool,
    pub dropout: bool,
    pub softcap_on: bool,
    pub alibi: bool,
    /// A relative-position bias is on.
    pub relative: bool,
    /// Its buckets (0 without one).
    pub buckets: usize,
    /// Soft-capping bound (1 without soft-capping).
    pub softcap: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub threshold: u32,
    pub keep_scale: f32,
}

/// Most buckets of a relative-position bias the kernels take: the `dQ` pass keeps one sum
/// per bucket in each unit's registers (spilling to local memory) while it sums the table's
/// gradient.
pub const MAX_BIAS_BUCKETS: usize = 128;

/// The score modifiers' buffer of a call with `heads` query heads, as the kernels' `score_mod`
/// reads it: `heads` ALiBi slopes (zeros without ALiBi); with a relative-position bias, then
/// its reach `M`, its bucket count, the bucket of each distance `-M..=M` (exact f32 integers)
/// and its `[heads, buckets]` table (the host table of `mods`; zeros when it is empty, for a
/// table that [`copy_table`] writes from the device).
pub(crate) fn mods_buffer(mods: &ScoreMods<'_>, heads: usize) -> Vec<f32> {
    let mut data: Vec<f32> = match mods.alibi {
        Some(slopes) => slopes.iter().map(|&x| x as f32).collect(),
        None => vec![0.0; heads.max(1)],
    };
    if let Some(bias) = mods.bias {
        let count = bias.buckets.count();
        data.push(bias.buckets.max_distance() as f32);
        data.push(count as f32);
        data.extend(bias.buckets.map().iter().map(|&b| b as f32));
        if bias.table.is_empty() {
            data.resize(data.len() + heads * count, 0.0);
        } else {
            data.extend(bias.table.iter().map(|&x| x as f32));
        }
    }
    data
}

/// Where the bias table starts in the buffer of [`mods_buffer`].
fn table_offset(bias: &RelativeBias<'_>, heads: usize) -> usize {
    heads.max(1) + 2 + bias.buckets.map().len()
}

/// Checks the modifiers against `heads` query heads: one ALiBi slope per head, a table of
/// `heads x buckets` (or none, for a device table).
pub(crate) fn check_mods(mods: &ScoreMods<'_>, heads: usize) -> Result<(), String> {
    if let Some(slopes) = mods.alibi
        && slopes.len() != heads
    {
        return Err(format!(
            "{} ALiBi slopes for {} query heads",
            slopes.len(),
            heads
        ));
    }
    if let Some(bias) = mods.bias
        && !bias.table.is_empty()
        && bias.table.len() != heads * bias.buckets.count()
    {
        return Err(format!(
            "a bias table of {} values for {} heads of {} buckets",
            bias.table.len(),
            heads,
            bias.buckets.count()
        ));
    }
    Ok(())
}

/// Copies the device bias table `table` (`len` elements of the inputs' dtype) into the
/// modifiers' buffer `data` from `offset` on, as f32.
#[cube(launch)]
fn copy_table_kernel<F: Float>(
    table: &[F],
    data: &mut [f32],
    offset: usize,
    len: usize,
    #[define(F)] _dtype: ElemType,
) {
    let i = ABSOLUTE_POS;
    if i < len {
        data[offset + i] = f32::cast_from(table[i]);
    }
}

/// Writes the device `table` (`[heads, buckets]` of `dtype`) into the modifiers' buffer
/// uploaded from [`mods_buffer`].
fn copy_table(
    client: &Client,
    dtype: ElemType,
    table: &Handle,
    data: &(Handle, usize),
    (offset, len): (usize, usize),
) {
    let cubes = len.div_ceil(256);
    copy_table_kernel::launch(
        client,
        grid_count(client, cubes),
        CubeDim::new_1d(256),
        arg(&(table.clone(), len)),
        arg(data),
        offset,
        len,
        dtype,
    );
}

impl DeviceOptions {
    /// The options of a call with `heads` query heads; `table`: the relative-position bias
    /// table on the device (`[heads, buckets]` of `dtype`) when `options` has a bias.
    fn upload(
        client: &Client,
        options: &KernelOptions,
        heads: usize,
        table: Option<(&Handle, ElemType)>,
    ) -> Self {
        let lengths: Vec<u32> = options
            .key_lengths
            .map(|l| l.iter().map(|&x| x as u32).collect())
            .unwrap_or_default();
        let dropout = options.dropout;
        let data = mods_buffer(&options.mods, heads);
        let slopes = (client.create_from_slice(f32::as_bytes(&data)), data.len());
        if let (Some(bias), Some((table, dtype))) = (options.mods.bias, table) {
            let len = heads * bias.buckets.count();
            copy_table(
                client,
                dtype,
                table,
                &slopes,
                (table_offset(&bias, heads), len),
            );
        }
        Self {
            lengths: upload(client, &lengths),
            slopes,
            relative: options.mods.bias.is_some(),
            buckets: options.mods.bias.map_or(0, |b| b.buckets.count()),
            softcap_on: options.mods.softcap.is_some(),
            alibi: options.mods.alibi.is_some(),
            softcap: options.mods.softcap.map_or(1.0, |c| c as f32),
            padded: options.key_lengths.is_some(),
            dropout: dropout.is_some(),
            seed_lo: dropout.map_or(0, |d| d.seed() as u32),
            seed_hi: dropout.map_or(0, |d| (d.seed() >> 32) as u32),
            threshold: dropout.map_or(0, |d| d.threshold()),
            keep_scale: dropout.map_or(1.0, |d| d.scale() as f32),
        }
    }
}

/// A buffer argument over `len` elements of `handle`.
pub(crate) fn arg((handle, len): &(Handle, usize)) -> BufferArg {
    // SAFETY: every handle passed here holds at least `len` elements: the layout arrays and
    // options were uploaded with exactly that length, and [`check_buffers`] checked the
    // tensors' handles against the shape before any launch.
    unsafe { BufferArg::from_raw_parts(handle.clone(), *len) }
}

/// The environment variable that makes every launch bounds-checked (`1`) in a release
/// build; debug builds always check.
pub const CHECKED_VAR: &str = "SPARSE_ATTN_CHECKED_KERNELS";

/// Whether launches check every global index (debug builds, or [`CHECKED_VAR`] set to
/// `1`): out-of-range reads then give zeros and writes are dropped, instead of undefined
/// behaviour.
pub(crate) fn bounds_checked() -> bool {
    static CHECKED: OnceLock<bool> = OnceLock::new();
    *CHECKED.get_or_init(|| {
        cfg!(debug_assertions) || std::env::var(CHECKED_VAR).is_ok_and(|v| v == "1")
    })
}

/// Launches `kernel` with bounds checks where [`bounds_checked`] asks for them, else
/// unchecked.
macro_rules! launch_kernel {
    ($kernel:ident ( $($arg:expr),* $(,)? )) => {
        if $crate::launch::bounds_checked() {
            $kernel::launch($($arg),*)
        } else {
            // SAFETY: every index the kernels compute is in range: the layout's arrays were
            // checked when they were uploaded (`DeviceLayout::upload`), the tensors' handles
            // against the shape (`check_buffers`), and the kernels index only within the
            // shape and the layout (the conformance matrix runs them checked as well).
            unsafe { $kernel::launch_unchecked($($arg),*) }
        }
    };
}
pub(crate) use launch_kernel;

/// A buffer to check: its name, handle, elements and bytes per element.
type BufferCheck<'h> = (&'static str, &'h Handle, usize, usize);

/// The forward's tensors `[q, k, v, out, lse]` of `dtype` (the log-sum-exp in f32) with the
/// elements each needs for `shape`.
fn forward_buffers<'h>(
    shape: &AttentionShape,
    dtype: ElemType,
    [q, k, v, out, lse]: [&'h Handle; 5],
) -> [BufferCheck<'h>; 5] {
    let (bytes, n, kv_n) = (dtype.size(), shape.numel(), shape.kv_numel());
    [
        ("q", q, n, bytes),
        ("k", k, kv_n, bytes),
        ("v", v, kv_n, bytes),
        ("out", out, n, bytes),
        ("lse", lse, shape.rows(), size_of::<f32>()),
    ]
}

/// Checks the problem against the layout, and every `(name, handle, elements, bytes per
/// element)` of `buffers` against the bytes its tensor needs.
///
/// # Errors
/// [`KernelError::Shape`] for a shape the layout or the kernels cannot serve,
/// [`KernelError::Buffer`] for a handle smaller than its tensor.
pub(crate) fn check_buffers(
    shape: &AttentionShape,
    layout: &DeviceLayout,
    options: &KernelOptions,
    buffers: &[BufferCheck<'_>],
) -> Result<(), KernelError> {
    let shape_error = |reason: String| Err(KernelError::Shape { reason });
    if shape.seq_len != layout.seq_len {
        return shape_error(format!(
            "seq_len {} differs from the layout's {}",
            shape.seq_len, layout.seq_len
        ));
    }
    if layout.layout_heads != 1 && layout.layout_heads != shape.heads {
        return shape_error(format!(
            "{} heads, but the layout has {} per-head rows (expected 1 or the head count)",
            shape.heads, layout.layout_heads
        ));
    }
    if shape.kv_heads == 0 || !shape.heads.is_multiple_of(shape.kv_heads) {
        return shape_error(format!(
            "{} key/value heads do not divide {} query heads",
            shape.kv_heads, shape.heads
        ));
    }
    if shape.head_dim == 0 {
        return shape_error("head dim 0: expected at least 1".to_string());
    }
    if let Some(lengths) = options.key_lengths
        && lengths.len() != shape.batch
    {
        return shape_error(format!(
            "{} key lengths for a batch of {}",
            lengths.len(),
            shape.batch
        ));
    }
    for &(name, handle, elements, bytes) in buffers {
        let needed = (elements * bytes) as u64;
        if handle.size_in_used() < needed {
            return Err(KernelError::Buffer {
                name,
                bytes: handle.size_in_used(),
                needed,
            });
        }
    }
    Ok(())
}

/// Everything a launch needs besides the tensors.
struct Grid {
    count: CubeCount,
    dim: CubeDim,
    tasks: usize,
    plan: TilePlan,
    mask_words: usize,
    permuted: bool,
    /// Lanes per vector read (4, 2 or 1: the widest dividing the head dim).
    lanes: usize,
    /// Vectors per row, `head_dim / lanes`.
    vecs: usize,
    /// Units per row (each takes every `splits`-th key, or query in the dK/dV pass).
    splits: usize,
}

/// Checks, before anything is launched, that `client`'s device can run a problem of
/// `shape` in `dtype` with blocks of `block` tokens: the dtype, the head dim, units and
/// shared memory per cube, and the kernels' 32-bit indexing. Returns the FMA kernels'
/// tile plan (the tensor-core kernels, where the device has them, need less).
///
/// # Errors
/// What [`TilePlan::for_device`] refuses, or [`KernelError::TooLarge`].
pub fn check_problem(
    client: &Client,
    dtype: ElemType,
    shape: &AttentionShape,
    block: usize,
) -> Result<TilePlan, KernelError> {
    let max = u32::MAX as usize;
    let elements = shape.numel();
    if elements > max {
        return Err(KernelError::TooLarge { elements, max });
    }
    TilePlan::for_device(client, dtype, block, shape.head_dim)
}

impl Grid {
    /// The buffer lengths of a launch over `shape`: vectors of the `[B, H, n, d]` and `[B,
    /// H_kv, n, d]` tensors, and rows of the log-sum-exp.
    fn elements(&self, shape: &AttentionShape) -> (usize, usize, usize) {
        (
            shape.numel() / self.lanes,
            shape.kv_numel() / self.lanes,
            shape.rows(),
        )
    }

    /// The grid over `heads` heads of each batch row (`shape.heads` for the passes over
    /// query rows, `shape.kv_heads` for the `dK`/`dV` pass).
    fn new(
        client: &Client,
        dtype: ElemType,
        shape: &AttentionShape,
        layout: &DeviceLayout,
        heads: usize,
    ) -> Result<Self, KernelError> {
        let plan = check_problem(client, dtype, shape, layout.block)?;
        let tasks = shape.batch * heads * layout.n_blocks;
        let splits = row_splits(tasks * layout.block, layout.block, plan.tile, client);
        let lanes = [4, 2, 1]
            .into_iter()
            .find(|l| shape.head_dim.is_multiple_of(*l))
            .unwrap_or(1);
        Ok(Self {
            lanes,
            vecs: shape.head_dim / lanes,
            count: grid_count(client, tasks),
            dim: CubeDim::new_1d((layout.block * splits) as u32),
            splits,
            tasks,
            plan,
            mask_words: 2 * layout.mask_words.max(1),
            permuted: layout.permuted,
        })
    }

    /// The FMA kernels' comptime configuration for this grid over `layout` with `opts`;
    /// `(with_dk, with_dv)` says what a dK/dV pass writes (ignored by the other kernels).
    fn config(
        &self,
        layout: &DeviceLayout,
        opts: &DeviceOptions,
        (with_dk, with_dv): (bool, bool),
    ) -> FmaConfig {
        FmaConfig {
            block: layout.block,
            vecs: self.vecs,
            tile: self.plan.tile,
            mask_words: self.mask_words,
            permuted: self.permuted,
            splits: self.splits,
            padded: opts.padded,
            dropout: opts.dropout,
            softcap: opts.softcap_on,
            alibi: opts.alibi,
            relative: opts.relative,
            buckets: opts.buckets,
            bias_grad: false,
            with_dk,
            with_dv,
        }
    }
}

/// A 2D grid of at least `tasks` cubes within the device's limit on the first dimension
/// (kernels decode `CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X` and skip the excess).
pub(crate) fn grid_count(client: &Client, tasks: usize) -> CubeCount {
    let max_x = client.properties().hardware.max_cube_count.0.max(1) as usize;
    let x = tasks.clamp(1, max_x);
    let y = tasks.div_ceil(x).max(1);
    CubeCount::Static(x as u32, y as u32, 1)
}

/// Below this many units (one per row) a launch gives each row several units.
const MIN_UNITS: usize = 16384;

/// Units per row: 1 when `rows` units already fill a device, else up to 4 (each unit then
/// takes every 2nd or 4th key of a tile and the cube merges their states), within the
/// device's units per cube and never more than the tile's rows.
fn row_splits(rows: usize, block: usize, tile: usize, client: &Client) -> usize {
    let max_units = client.properties().hardware.max_units_per_cube as usize;
    let mut splits = 1;
    while splits < 4
        && rows * splits < MIN_UNITS
        && block * splits * 2 <= max_units
        && splits * 2 <= tile
    {
        splits *= 2;
    }
    splits
}

/// Largest head dim whose `dK` and `dV` are computed in one pass.
const FUSED_DKDV_MAX_HEAD_DIM: usize = 32;

/// A tensor buffer of `len` elements (vectors for the `[B, H, n, d]` tensors).
pub(crate) fn tensor(handle: &Handle, len: usize) -> BufferArg {
    arg(&(handle.clone(), len))
}

/// Forward pass: writes `out` (`[B, H, n, d]`) and `lse` (`[B, H, n]`, f32 whatever the
/// input dtype, natural log, `-inf` for rows with no allowed key, whose output is zero).
///
/// `q`, `k`, `v`, `out` are contiguous buffers of `dtype` elements, `lse` of f32, in token
/// order, on `client`'s device, where `layout` was uploaded; `options` adds key padding,
/// dropout and the score modifiers. With a relative-position bias in `options`, its table
/// is either the options' host table or, when that is empty, `bias_table` (`[heads,
/// buckets]` of `dtype` on the device). Every handle is checked against the shape before
/// anything is launched, so the kernels never index past a buffer.
///
/// # Errors
/// What [`TilePlan::for_device`] refuses, tensors beyond 32-bit indexing, a shape the
/// layout was not built for ([`KernelError::Shape`]) or a handle smaller than its tensor
/// ([`KernelError::Buffer`]).
///
/// # Example
/// ```no_run
/// # use cubecl::client::Client;
/// # use cubecl::server::Handle;
/// # use sparse_attn_wgpu::{AttentionShape, CsrLayout, DeviceLayout, KernelError, KernelOptions};
/// # fn run(client: &Client, view: &CsrLayout, [q, k, v, out, lse]: [&Handle; 5])
/// #     -> Result<(), KernelError> {
/// let dtype = cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F32);
/// let shape = AttentionShape { batch: 1, heads: 4, kv_heads: 4, seq_len: view.seq_len, head_dim: 64 };
/// // Upload once per layout and device, reuse for every call.
/// let layout = DeviceLayout::upload(client, view)?;
/// let scale = 1.0 / 8.0;
/// sparse_attn_wgpu::forward(client, dtype, shape, &layout, scale, &KernelOptions::default(), [q, k, v, out, lse], None)?;
/// # Ok(()) }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn forward(
    client: &Client,
    dtype: ElemType,
    shape: AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    options: &KernelOptions,
    [q, k, v, out, lse]: [&Handle; 5],
    bias_table: Option<&Handle>,
) -> Result<KernelPath, KernelError> {
    let grid = Grid::new(client, dtype, &shape, layout, shape.heads)?;
    let mut buffers = forward_buffers(&shape, dtype, [q, k, v, out, lse]).to_vec();
    let table = table_buffer(&shape, dtype, options, bias_table)?;
    buffers.extend(table.map(|(check, _)| check));
    check_buffers(&shape, layout, options, &buffers)?;
    let table = table.map(|(_, handle)| (handle, dtype));
    let opts = DeviceOptions::upload(client, options, shape.heads, table);
    if let Some(plan) = TensorCorePlan::for_device(client, dtype, layout.block, shape.head_dim) {
        let tensors = [q, k, v, out, lse];
        tensor_core::forward(client, &plan, dtype, shape, layout, scale, &opts, tensors);
        return Ok(KernelPath::TensorCore.counted());
    }
    let (numel, kv_numel, rows) = grid.elements(&shape);
    let (args, config) = (
        problem_args(&shape, layout, grid.tasks, scale, &opts, 0.0),
        grid.config(layout, &opts, (false, false)),
    );
    launch_kernel!(forward_kernel(
        client,
        grid.count,
        grid.dim,
        grid.lanes,
        tensor(q, numel),
        tensor(k, kv_numel),
        tensor(v, kv_numel),
        tensor(out, numel),
        tensor(lse, rows),
        arg(&layout.row_ptr),
        arg(&layout.cols),
        arg(&layout.masks),
        arg(&layout.mask_bits),
        arg(&layout.order),
        arg(&opts.lengths),
        arg(&opts.slopes),
        args,
        config,
        dtype,
    ));
    Ok(KernelPath::Fma.counted())
}

/// Backward pass: writes `dq` (`[B, H, n, d]`), `dk`, `dv` (`[B, H_kv, n, d]`) of `sum(out *
/// dout)` from the forward's `out` and `lse` and the forward's `options` (the dropout mask
/// is regenerated). Runs the `dQ` kernel, then the `dK`/`dV` kernel (as one pass, or a `dV`
/// pass and a `dK` pass for head dims above 32). Buffers as in [`forward`] (`dout`, `dq` like
/// `q`; `dk`, `dv` like `k`), checked the same way. With a relative-position bias in
/// `options`, `bias` holds the device table of [`forward`] (or `None` with a host table)
/// and `dbias`, an f32 buffer of `heads x buckets` that receives the table's gradient:
/// per query block the sum over its keys of the scores' gradients, by bucket, then the
/// sum of those over batch rows and blocks, each in a fixed order (no atomics).
///
/// # Errors
/// As [`forward`], and [`KernelError::Shape`] for a bias without `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    client: &Client,
    dtype: ElemType,
    shape: AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    options: &KernelOptions,
    [q, k, v, out, lse, dout]: [&Handle; 6],
    [dq, dk, dv]: [&Handle; 3],
    (bias_table, dbias): (Option<&Handle>, Option<&Handle>),
) -> Result<KernelPath, KernelError> {
    let grid = Grid::new(client, dtype, &shape, layout, shape.heads)?;
    let kv_grid = Grid::new(client, dtype, &shape, layout, shape.kv_heads)?;
    let (bytes, n, kv_n) = (dtype.size(), shape.numel(), shape.kv_numel());
    let mut buffers = forward_buffers(&shape, dtype, [q, k, v, out, lse]).to_vec();
    #[rustfmt::skip]
    buffers.extend([
        ("dout", dout, n, bytes), ("dq", dq, n, bytes),
        ("dk", dk, kv_n, bytes), ("dv", dv, kv_n, bytes),
    ]);
    let table = table_buffer(&shape, dtype, options, bias_table)?;
    buffers.extend(table.map(|(check, _)| check));
    let buckets = options.mods.bias.map(|b| b.buckets.count());
    let dbias = match (buckets, dbias) {
        (None, _) => None,
        (Some(count), Some(dbias)) => {
            buffers.push(("dbias", dbias, shape.heads * count, size_of::<f32>()));
            Some((dbias, count))
        }
        (Some(_), None) => {
            return Err(KernelError::Shape {
                reason: "a relative-position bias needs a `dbias` buffer".to_string(),
            });
        }
    };
    check_buffers(&shape, layout, options, &buffers)?;
    let table = table.map(|(_, handle)| (handle, dtype));
    let opts = DeviceOptions::upload(client, options, shape.heads, table);
    // Both `dQ` kernels sum the bias gradient per query block; one ordered sum follows.
    let sums = dbias.map(|(_, count)| bias_sums(client, &shape, layout, count));
    let path = if let Some(plan) =
        TensorCorePlan::for_device(client, dtype, layout.block, shape.head_dim)
    {
        let (inputs, grads) = ([q, k, v, out, lse, dout], [dq, dk, dv]);
        tensor_core::backward(
            client,
            &plan,
            dtype,
            shape,
            layout,
            scale,
            &opts,
            inputs,
            grads,
            sums.as_ref(),
        );
        KernelPath::TensorCore
    } else {
        let tensors = [q, k, v, out, lse, dout, dq];
        let delta = dq_pass(
            client,
            dtype,
            &shape,
            layout,
            scale,
            &opts,
            &grid,
            tensors,
            sums.as_ref(),
        );
        dkdv_passes(
            client,
            dtype,
            &shape,
            layout,
            scale,
            &opts,
            &kv_grid,
            [q, k, v, lse, dout, dk, dv],
            &delta,
        );
        KernelPath::Fma
    };
    if let (Some(sums), Some(dbias)) = (&sums, dbias) {
        sum_bias_grad(client, &shape, layout, sums, dbias);
    }
    Ok(path.counted())
}

/// The bias table's buffer check and handle: the device table when `options` has a
/// relative-position bias with no host table.
fn table_buffer<'h>(
    shape: &AttentionShape,
    dtype: ElemType,
    options: &KernelOptions,
    bias_table: Option<&'h Handle>,
) -> Result<Option<(BufferCheck<'h>, &'h Handle)>, KernelError> {
    check_mods(&options.mods, shape.heads).map_err(|reason| KernelError::Shape { reason })?;
    match (options.mods.bias, bias_table) {
        (Some(bias), Some(table)) if bias.table.is_empty() => {
            let len = shape.heads * bias.buckets.count();
            Ok(Some((("bias_table", table, len, dtype.size()), table)))
        }
        (Some(bias), None) if bias.table.is_empty() => Err(KernelError::Shape {
            reason: "a relative-position bias with neither a host nor a device table".to_string(),
        }),
        _ => Ok(None),
    }
}

/// The FMA `dQ` pass over `[q, k, v, out, lse, dout, dq]`, and with `bias_sums`, the
/// per-query-block sums of the bias gradient there. Returns the row deltas it wrote.
#[allow(clippy::too_many_arguments)]
fn dq_pass(
    client: &Client,
    dtype: ElemType,
    shape: &AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    opts: &DeviceOptions,
    grid: &Grid,
    [q, k, v, out, lse, dout, dq]: [&Handle; 7],
    bias_sums: Option<&(Handle, usize)>,
) -> (Handle, usize) {
    let (numel, kv_numel, rows) = grid.elements(shape);
    let delta = (client.empty(rows * size_of::<f32>()), rows);
    let none = (client.empty(size_of::<f32>()), 1);
    let sums = bias_sums.unwrap_or(&none);
    let config = FmaConfig {
        bias_grad: bias_sums.is_some(),
        ..grid.config(layout, opts, (false, false))
    };
    launch_kernel!(dq_kernel(
        client,
        grid.count.clone(),
        grid.dim,
        grid.lanes,
        tensor(q, numel),
        tensor(k, kv_numel),
        tensor(v, kv_numel),
        tensor(out, numel),
        tensor(lse, rows),
        tensor(dout, numel),
        tensor(dq, numel),
        arg(&delta),
        arg(&layout.row_ptr),
        arg(&layout.cols),
        arg(&layout.masks),
        arg(&layout.mask_bits),
        arg(&layout.order),
        arg(&opts.lengths),
        arg(&opts.slopes),
        arg(sums),
        problem_args(shape, layout, grid.tasks, scale, opts, 0.0),
        config,
        dtype,
    ));
    delta
}

/// A buffer for the per-query-block sums of the bias gradient (`[batch, heads, n_blocks,
/// buckets]` f32) that a `dQ` pass fills.
fn bias_sums(
    client: &Client,
    shape: &AttentionShape,
    layout: &DeviceLayout,
    count: usize,
) -> (Handle, usize) {
    let entries = shape.batch * shape.heads * layout.n_blocks * count;
    (client.empty(entries * size_of::<f32>()), entries)
}

/// The relative-position bias gradient `dbias` (`heads x buckets` f32): the ordered sum of
/// a `dQ` pass's per-query-block sums `sums`.
fn sum_bias_grad(
    client: &Client,
    shape: &AttentionShape,
    layout: &DeviceLayout,
    sums: &(Handle, usize),
    (dbias, count): (&Handle, usize),
) {
    let entries = shape.heads * count;
    launch_kernel!(bias_sum_kernel(
        client,
        grid_count(client, entries.div_ceil(64)),
        CubeDim::new_1d(64),
        arg(sums),
        arg(&(dbias.clone(), entries)),
        shape.batch,
        shape.heads,
        layout.n_blocks,
        count,
    ));
}

/// The FMA `dK`/`dV` passes over `[q, k, v, lse, dout, dk, dv]` with the `dQ` pass's row
/// deltas.
#[allow(clippy::too_many_arguments)]
fn dkdv_passes(
    client: &Client,
    dtype: ElemType,
    shape: &AttentionShape,
    layout: &DeviceLayout,
    scale: f32,
    opts: &DeviceOptions,
    kv_grid: &Grid,
    [q, k, v, lse, dout, dk, dv]: [&Handle; 7],
    delta: &(Handle, usize),
) {
    let (numel, kv_numel, rows) = kv_grid.elements(shape);
    // Rows of up to 32 elements keep k, v, dk and dv in registers in one pass; longer rows
    // take a dV pass and a dK pass (two or three rows in registers each, no spills).
    let passes: &[(bool, bool)] = if shape.head_dim <= FUSED_DKDV_MAX_HEAD_DIM {
        &[(true, true)]
    } else {
        &[(false, true), (true, false)]
    };
    for &(with_dk, with_dv) in passes {
        launch_kernel!(dkdv_kernel(
            client,
            kv_grid.count.clone(),
            kv_grid.dim,
            kv_grid.lanes,
            tensor(q, numel),
            tensor(k, kv_numel),
            tensor(v, kv_numel),
            tensor(lse, rows),
            tensor(dout, numel),
            arg(delta),
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
            problem_args(shape, layout, kv_grid.tasks, scale, opts, 0.0),
            kv_grid.config(layout, opts, (with_dk, with_dv)),
            dtype,
        ));
    }
}

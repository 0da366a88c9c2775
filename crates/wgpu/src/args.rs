//! The arguments every attention kernel takes besides its buffers: the launch scalars
//! ([`ProblemArgs`], one `CubeLaunch` struct for the forward and backward kernels of both
//! paths) and the FMA kernels' comptime configuration ([`FmaConfig`]). A new per-call option
//! adds its scalars here and its switch to the configs, not a parameter to every kernel.

use cubecl::prelude::*;

use crate::device_layout::DeviceLayout;
use crate::launch::DeviceOptions;
use sparse_attn_kernel_types::AttentionShape;

/// The scalars of one attention launch, the same for every forward and backward kernel
/// (the FMA kernels leave `rescale_slack` at 0).
#[derive(CubeLaunch, CubeType)]
pub(crate) struct ProblemArgs {
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Blocks per sequence.
    pub n_blocks: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// 1 when all heads share the layout.
    pub shared_layout: u32,
    /// Cubes with work (the grid may have more).
    pub tasks: usize,
    /// Score scale.
    pub scale: f32,
    /// The log-sum-exp of an empty row.
    pub neg_inf: f32,
    /// Dropout seed, low half.
    pub seed_lo: u32,
    /// Dropout seed, high half.
    pub seed_hi: u32,
    /// Dropout threshold on the 32-bit hash.
    pub threshold: u32,
    /// Factor of kept probabilities.
    pub keep_scale: f32,
    /// How far a tile's row maximum may pass the forward's running maximum before the
    /// output accumulators are rescaled (see `rescale_slack`); 0 rescales on every rise.
    pub rescale_slack: f32,
    /// Soft-capping bound of the scores (read only with the configs' `softcap`).
    pub softcap: f32,
}

/// The launch scalars of a problem: its shape and layout, `tasks` cubes with work, the
/// softmax `scale`, the options on the device and the tensor-core forward's rescale slack.
pub(crate) fn problem_args(
    shape: &AttentionShape,
    layout: &DeviceLayout,
    tasks: usize,
    scale: f32,
    opts: &DeviceOptions,
    rescale_slack: f32,
) -> ProblemArgsLaunch {
    ProblemArgsLaunch::new(
        shape.seq_len,
        layout.n_blocks,
        shape.heads,
        shape.kv_heads,
        u32::from(layout.layout_heads == 1),
        tasks,
        scale,
        f32::NEG_INFINITY,
        opts.seed_lo,
        opts.seed_hi,
        opts.threshold,
        opts.keep_scale,
        rescale_slack,
        opts.softcap,
    )
}

/// What the FMA kernels are specialised on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct FmaConfig {
    /// Tokens per block.
    pub block: usize,
    /// Vectors per row (`head_dim / lanes`).
    pub vecs: usize,
    /// Rows of the other side staged per tile (keys in the forward and dQ pass, queries in
    /// the dK/dV pass).
    pub tile: usize,
    /// 32-bit words per element mask.
    pub mask_words: usize,
    /// The layout carries a token order.
    pub permuted: bool,
    /// Units per row (they split the keys).
    pub splits: usize,
    /// Key lengths are given.
    pub padded: bool,
    /// Dropout is on.
    pub dropout: bool,
    /// Scores are soft-capped.
    pub softcap: bool,
    /// Scores carry ALiBi biases (slopes in the modifiers' buffer).
    pub alibi: bool,
    /// Scores carry a relative-position bias (map and table in the modifiers' buffer).
    pub relative: bool,
    /// Buckets of the relative-position bias (0 without one).
    pub buckets: usize,
    /// The `dQ` pass sums the relative-position bias gradient of each query block.
    pub bias_grad: bool,
    /// The dK/dV pass writes `dK`.
    pub with_dk: bool,
    /// The dK/dV pass writes `dV`.
    pub with_dv: bool,
}

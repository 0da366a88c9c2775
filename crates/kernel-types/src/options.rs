//! The per-call options every kernel takes besides the tensors and the layout.

use crate::dropout::DropoutMask;
use crate::score_mods::ScoreMods;

/// Options of one kernel call, borrowed from the validated parameters of the public API
/// (`sparse_attn_core::AttentionParams`); the default is plain attention.
///
/// Each backend turns it into its own form where it applies the options: the CPU kernels per
/// `(batch, head)`, the CubeCL kernels as launch scalars and a lengths buffer.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct KernelOptions<'a> {
    /// Valid tokens of each batch row (`batch` entries, each at most `seq_len`): tokens
    /// `>= len` are neither queries (zero output, zero gradients) nor keys.
    pub key_lengths: Option<&'a [usize]>,
    /// Dropout on the attention probabilities.
    pub dropout: Option<DropoutMask>,
    /// Changes to the scores before the softmax (soft-capping, ALiBi).
    pub mods: ScoreMods<'a>,
}

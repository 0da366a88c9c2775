//! The non-tensor parameters of the backend ops, validated by the public API.

use std::sync::Arc;

pub use sparse_attn_kernel_types::{DropoutMask, RelativeBuckets};

/// What the [`SparseAttentionBackend`](crate::SparseAttentionBackend) ops take besides the
/// tensors and the layout. Built by the public API from [`AttentionOptions`](crate::AttentionOptions)
/// after validation; cheap to clone.
///
/// Grouped-query attention needs no parameter: `k` and `v` carry `kv_heads` heads (a divisor
/// of `q`'s heads) and query head `h` reads key/value head `h / (heads / kv_heads)`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionParams {
    /// Softmax scale, finite and positive.
    pub scale: f64,
    /// Dropout on the attention probabilities (`None`: none, the plain kernels).
    pub dropout: Option<DropoutMask>,
    /// Valid tokens of each batch row (`batch` entries, each at most `seq_len`); tokens past
    /// a row's length are neither queries (zero output and gradients) nor keys. `None`: every
    /// token is valid.
    pub key_lengths: Option<Arc<[usize]>>,
    /// Soft-capping, ALiBi and the relative-position buckets (the bias table itself is a
    /// tensor input of the biased ops, whose gradient they return).
    pub mods: ScoreModParams,
}

/// Validated score modifiers, owned by the ops' parameters (the kernels borrow them as
/// [`ScoreMods`](sparse_attn_kernel_types::ScoreMods)); the default changes nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScoreModParams {
    /// Soft-capping bound of the scaled scores (finite, positive; `None`: none).
    pub softcap: Option<f64>,
    /// ALiBi slopes, one finite slope per query head (`None`: no ALiBi).
    pub alibi: Option<Arc<[f64]>>,
    /// The buckets of a relative-position bias (`None`: none). Set exactly when the call
    /// has a bias table: the biased ops of the attention, the decode parameters' `bias_table`.
    pub relative: Option<RelativeBuckets>,
}

impl ScoreModParams {
    /// The kernels' view of these modifiers, with the values of the relative-position bias
    /// table (`[heads, buckets]`) when [`relative`](Self::relative) is set.
    ///
    /// # Panics
    /// If `relative` is set without a table or the other way round (the public API pairs
    /// them).
    pub fn view<'a>(&'a self, table: Option<&'a [f64]>) -> sparse_attn_kernel_types::ScoreMods<'a> {
        let bias = match (&self.relative, table) {
            (Some(buckets), Some(table)) => {
                Some(sparse_attn_kernel_types::RelativeBias { buckets, table })
            }
            (None, None) => None,
            _ => panic!("a relative-position bias needs both its buckets and its table"),
        };
        sparse_attn_kernel_types::ScoreMods {
            softcap: self.softcap,
            alibi: self.alibi.as_deref(),
            bias,
        }
    }
}

impl AttentionParams {
    /// Plain attention with `scale`.
    pub fn plain(scale: f64) -> Self {
        Self {
            scale,
            dropout: None,
            key_lengths: None,
            mods: ScoreModParams::default(),
        }
    }

    /// The kernels' view of the options (every kernel crate takes this one type), with the
    /// relative-position bias table's values of a biased op.
    pub(crate) fn kernel_options<'a>(
        &'a self,
        bias_table: Option<&'a [f64]>,
    ) -> sparse_attn_kernel_types::KernelOptions<'a> {
        sparse_attn_kernel_types::KernelOptions {
            key_lengths: self.key_lengths.as_deref(),
            dropout: self.dropout,
            mods: self.mods.view(bias_table),
        }
    }
}

//! The original Sparse Transformer API: `attention_impl`, `blocksparse_attention_impl` and
//! the `SparseAttention` callable, on `[batch, n_ctx, n_embd]` tensors.

use std::str::FromStr;
use std::sync::Arc;

use burn::tensor::{Tensor, TensorData};

use crate::api::{AttentionOptions, sparse_attention};
use crate::cache::LayoutCache;
use crate::error::{Result, SparseAttentionError, invalid};
use crate::pattern::{Band, Fixed, Pattern, Strided};

/// The Sparse Transformer's attention modes (`attn_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttnMode {
    /// Causal dense: `j <= i`.
    All,
    /// `0 <= i - j < local_attn_ctx`.
    Local,
    /// `j <= i`, `(i - j) mod local_attn_ctx == 0`.
    Strided,
    /// Chunks of `local_attn_ctx` plus per-head summary columns.
    Fixed,
}

impl FromStr for AttnMode {
    type Err = SparseAttentionError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(Self::All),
            "local" => Ok(Self::Local),
            "strided" => Ok(Self::Strided),
            "fixed" => Ok(Self::Fixed),
            other => Err(SparseAttentionError::UnknownMode(other.to_string())),
        }
    }
}

/// Parameters of a mode, as the original functions take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeParams {
    /// `local_attn_ctx` (window of `local`, stride of `strided`, chunk of `fixed`).
    pub local_attn_ctx: Option<usize>,
    /// Block size (`fixed` uses it for the summary width `vertsize * blocksize`).
    pub blocksize: usize,
    /// `fixed`: number of head groups.
    pub num_verts: usize,
    /// `fixed`: summary blocks per group.
    pub vertsize: usize,
}

impl AttnMode {
    /// The pattern of this mode.
    ///
    /// # Errors
    /// A missing or zero `local_attn_ctx` for `local`/`strided`/`fixed`, or invalid `fixed`
    /// parameters.
    pub fn pattern(self, p: ModeParams) -> Result<Arc<dyn Pattern>> {
        let ctx = |mode: &'static str| {
            p.local_attn_ctx
                .ok_or_else(|| invalid(mode, "local_attn_ctx is required for this mode"))
        };
        Ok(match self {
            Self::All => Arc::new(Band::causal()),
            Self::Local => Arc::new(Band::local(ctx("local")?)?),
            Self::Strided => Arc::new(Strided::new(ctx("strided")?)?),
            Self::Fixed => Arc::new(Fixed::sparse_transformer(
                ctx("fixed")?,
                p.num_verts,
                p.vertsize,
                p.blocksize,
            )?),
        })
    }
}

/// `[B, n, E]` -> `[B, H, n, E / H]`.
fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, e] = x.dims();
    x.reshape([b, n, heads, e / heads]).swap_dims(1, 2)
}

/// `[B, H, n, d]` -> `[B, n, H * d]`.
fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}

/// Validates `[B, n, E]` inputs and the head count; returns `(n, E)`.
fn check_inputs(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
) -> Result<(usize, usize)> {
    let dims = q.dims();
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != dims {
            return Err(SparseAttentionError::Shape {
                name,
                got: t.dims().to_vec(),
                expected: format!("{dims:?}, the shape of `q`"),
            });
        }
    }
    if heads == 0 {
        return Err(SparseAttentionError::Zero { name: "heads" });
    }
    if let Some(name) = ["batch", "n_ctx", "n_embd"]
        .into_iter()
        .zip(dims)
        .find_map(|(name, x)| (x == 0).then_some(name))
    {
        return Err(SparseAttentionError::Zero { name });
    }
    if !dims[2].is_multiple_of(heads) {
        return Err(SparseAttentionError::HeadsDivide {
            n_embd: dims[2],
            heads,
        });
    }
    Ok((dims[1], dims[2]))
}

/// Dense masked attention of the original code: scores of disallowed pairs are replaced by
/// `-1e9` before the softmax (identical to skipping them for rows with an allowed key;
/// every row of these causal modes has one). Materialises `n x n`: for reference use.
///
/// # Shapes
/// `q`, `k`, `v`: `[batch, n_ctx, n_embd]` -> `[batch, n_ctx, n_embd]`.
///
/// # Errors
/// Shapes, `heads` not dividing `n_embd`, a missing `local_attn_ctx`, or mode `fixed` (the
/// original dense path has no `num_verts`/`vertsize`; use [`blocksparse_attention_impl`]).
pub fn attention_impl(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    attn_mode: AttnMode,
    local_attn_ctx: Option<usize>,
) -> Result<Tensor<3>> {
    let (n, e) = check_inputs(&q, &k, &v, heads)?;
    if attn_mode == AttnMode::Fixed {
        return Err(invalid(
            "fixed",
            "attention_impl takes no num_verts/vertsize (as in the original): expected all, local \
             or strided; use blocksparse_attention_impl for fixed",
        ));
    }
    let params = ModeParams {
        local_attn_ctx,
        blocksize: 1,
        num_verts: 1,
        vertsize: 1,
    };
    let pattern = attn_mode.pattern(params)?;
    let mask: Vec<f32> = (0..n * n)
        .map(|x| f32::from(u8::from(pattern.allows(0, x / n, x % n))))
        .collect();
    let device = q.device();
    let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, n]), &device).reshape([1, 1, n, n]);
    let (q, k, v) = (
        split_heads(q, heads),
        split_heads(k, heads),
        split_heads(v, heads),
    );
    let scale = 1.0 / ((e / heads) as f64).sqrt();
    let w = q.matmul(k.swap_dims(2, 3)) * scale;
    let w = w * mask.clone() + (mask.neg() + 1.0) * -1e9;
    let w = burn::tensor::activation::softmax(w, 3);
    Ok(merge_heads(w.matmul(v)))
}

/// Block-sparse attention with the original signature. Accepts every input the original
/// accepted (and lifts its restrictions: any `n_ctx`, any `local_attn_ctx`); the token
/// predicate of the mode defines the result.
///
/// # Shapes
/// `q`, `k`, `v`: `[batch, n_ctx, n_embd]` -> `[batch, n_ctx, n_embd]`.
///
/// # Errors
/// Shapes, `heads` not dividing `n_embd`, block size outside `1..=128`, invalid mode
/// parameters (`local_attn_ctx` 0 or missing, `num_verts * vertsize` beyond
/// `local_attn_ctx / blocksize`, `heads` not a multiple of `num_verts`).
///
/// # Example
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use sparse_attn_core::{AttnMode, blocksparse_attention_impl};
///
/// let device = Device::ndarray();
/// let x = Tensor::<3>::random([1, 128, 64], Distribution::Normal(0.0, 1.0), &device);
/// let y = blocksparse_attention_impl(x.clone(), x.clone(), x, 4, AttnMode::Local, Some(32), 32, 1, 1).unwrap();
/// assert_eq!(y.dims(), [1, 128, 64]);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn blocksparse_attention_impl(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
    attn_mode: AttnMode,
    local_attn_ctx: Option<usize>,
    blocksize: usize,
    num_verts: usize,
    vertsize: usize,
) -> Result<Tensor<3>> {
    SparseAttention::new(
        heads,
        attn_mode,
        ModeParams {
            local_attn_ctx,
            blocksize,
            num_verts,
            vertsize,
        },
    )?
    .forward(q, k, v)
}

/// A block-sparse attention callable on `[batch, n_ctx, n_embd]` tensors, as in the
/// original README; layouts are built once per sequence length and reused.
#[derive(Debug, Clone)]
pub struct SparseAttention {
    heads: usize,
    mode: AttnMode,
    layouts: LayoutCache,
}

impl SparseAttention {
    /// An attention of `heads` heads in `mode`.
    ///
    /// # Errors
    /// Invalid mode parameters or a block size outside `1..=128`.
    pub fn new(heads: usize, mode: AttnMode, params: ModeParams) -> Result<Self> {
        if heads == 0 {
            return Err(SparseAttentionError::Zero { name: "heads" });
        }
        if !(crate::layout::MIN_BLOCK..=crate::layout::MAX_BLOCK).contains(&params.blocksize) {
            return Err(SparseAttentionError::BlockSize {
                got: params.blocksize,
                min: crate::layout::MIN_BLOCK,
                max: crate::layout::MAX_BLOCK,
            });
        }
        let pattern = mode.pattern(params)?;
        pattern.validate(1, heads)?;
        Ok(Self {
            heads,
            mode,
            layouts: LayoutCache::new(pattern, params.blocksize, heads),
        })
    }

    /// The mode.
    pub fn mode(&self) -> AttnMode {
        self.mode
    }

    /// The layout used for `n_ctx` tokens.
    ///
    /// # Errors
    /// As [`crate::BlockLayout::build`].
    pub fn layout(&self, n_ctx: usize) -> Result<crate::BlockLayout> {
        self.layouts.get(n_ctx)
    }

    /// Attention of `q`, `k`, `v` (`[batch, n_ctx, n_embd]`).
    ///
    /// # Errors
    /// Shapes, `heads` not dividing `n_embd`, devices.
    pub fn forward(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Result<Tensor<3>> {
        let (n, _) = check_inputs(&q, &k, &v, self.heads)?;
        let layout = self.layouts.get(n)?;
        let split = |x| split_heads(x, self.heads);
        let out = sparse_attention(
            split(q),
            split(k),
            split(v),
            &layout,
            AttentionOptions::default(),
        )?;
        Ok(merge_heads(out))
    }
}

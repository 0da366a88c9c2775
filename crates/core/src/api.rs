//! The tensor-level entry point: validated block-sparse attention on `[batch, heads, n, d]`.

use burn::backend::Dispatch;
use burn::tensor::Tensor;

use crate::backend::SparseAttentionBackend;
use crate::error::{Result, SparseAttentionError};
use crate::layout::BlockLayout;
use crate::params::{AttentionParams, DropoutMask, RelativeBuckets, ScoreModParams};

/// Options of [`sparse_attention`]: the default is plain attention with scale
/// `1 / sqrt(head_dim)`.
#[derive(Debug, Clone, Default)]
pub struct AttentionOptions {
    /// Softmax scale; `None` (default) means `1 / sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Dropout on the attention probabilities: `(p, seed)`. Pair `(i, j)` of `(batch,
    /// head)` is dropped with probability `p` (kept ones scaled by `1 / (1 - p)`) by a
    /// counter-based generator keyed by `(seed, batch, head, i, j)`: the same seed gives the
    /// same mask on every backend, and the backward pass regenerates it. `p = 0` is exactly
    /// no dropout. Applied whenever set: a layer sets it only in training.
    pub dropout: Option<(f64, u64)>,
    /// Valid length of each batch row (`batch` entries, each at most `n`): tokens past it
    /// are padding, neither queries (zero output and gradients) nor keys. No `n x n` mask
    /// is built.
    pub key_lengths: Option<Vec<usize>>,
    /// Soft-capping of the scaled scores, `cap * tanh(s / cap)` (Gemma-style logit capping),
    /// applied before ALiBi and the masks; `cap` finite and positive.
    pub softcap: Option<f64>,
    /// ALiBi: each scaled (and capped) score of query token `i` and key token `j` in head
    /// `h` minus `slope_h * |i - j|` (distance in token order, also under a permuted layout).
    pub alibi: Option<Alibi>,
    /// A learnable relative-position bias (T5): `table[h, bucket(i - j)]` added to each
    /// scaled, capped and ALiBi-shifted score; differentiable with respect to the table.
    pub relative_bias: Option<RelativePositionBias>,
}

/// A learnable relative-position bias (T5, Raffel et al. 2020): a `[heads, buckets]` table
/// of biases, one per query head and bucket of the signed token distance `i - j` (token
/// order, also under a permuted layout; the bucketing is [`RelativeBuckets`]'s).
///
/// The table is a tensor of the inputs' dtype and device; under an autodiff device it gets
/// its gradient from the backward pass: per `(head, bucket)`, the sum of the gradients of
/// the scores in that bucket, summed in a fixed order by every backend (no atomics).
#[derive(Debug, Clone)]
pub struct RelativePositionBias {
    /// `[heads, buckets.count()]` biases.
    pub table: Tensor<2>,
    /// The bucketing of the distances.
    pub buckets: RelativeBuckets,
}

/// The slopes of [`AttentionOptions::alibi`].
#[derive(Debug, Clone, PartialEq)]
pub enum Alibi {
    /// The standard geometric slopes of ALiBi for the input's head count
    /// ([`alibi_slopes`](crate::alibi_slopes)).
    Standard,
    /// One slope per query head (finite).
    Slopes(Vec<f64>),
}

impl AttentionOptions {
    /// Options with an explicit scale.
    pub fn with_scale(scale: f64) -> Self {
        Self {
            scale: Some(scale),
            ..Self::default()
        }
    }

    /// These options with dropout probability `p` drawn from `seed`.
    pub fn dropout(mut self, p: f64, seed: u64) -> Self {
        self.dropout = Some((p, seed));
        self
    }

    /// These options with per-batch-row valid lengths.
    pub fn key_lengths(mut self, lengths: impl Into<Vec<usize>>) -> Self {
        self.key_lengths = Some(lengths.into());
        self
    }

    /// These options with the scores soft-capped at `cap`.
    pub fn softcap(mut self, cap: f64) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// These options with ALiBi at the standard slopes.
    pub fn alibi(mut self) -> Self {
        self.alibi = Some(Alibi::Standard);
        self
    }

    /// These options with ALiBi at the given per-head slopes.
    pub fn alibi_slopes(mut self, slopes: impl Into<Vec<f64>>) -> Self {
        self.alibi = Some(Alibi::Slopes(slopes.into()));
        self
    }

    /// These options with a learnable relative-position bias: `table` `[heads,
    /// buckets.count()]` over the distance buckets `buckets`.
    pub fn relative_bias(mut self, table: Tensor<2>, buckets: RelativeBuckets) -> Self {
        self.relative_bias = Some(RelativePositionBias { table, buckets });
        self
    }
}

/// Block-sparse multi-head attention: `out[b, h, i] = sum_j softmax_j(scale q_i . k_j) v_j`
/// over the keys `j` that `layout` allows for query `i` in head `h` (and that
/// `options.key_lengths` counts as valid; with `options.dropout`, each term times its keep
/// factor).
///
/// Differentiable (under an autodiff device its backward runs the backend's sparse
/// backward op); never allocates an `n x n` matrix. A row with no allowed key returns zeros.
///
/// # Shapes
/// `q`: `[batch, heads, n, d]`, `n == layout.seq_len()`, `heads == layout.heads()`;
/// `k`, `v`: `[batch, kv_heads, n, d]` with `kv_heads` dividing `heads` (grouped-query
/// attention; `kv_heads == heads` is plain multi-head attention, 1 multi-query): query head
/// `h` reads key/value head `h / (heads / kv_heads)`. Output `[batch, heads, n, d]`.
///
/// # Errors
/// Shapes that differ or are empty, `kv_heads` not dividing `heads`, a layout built for
/// another `n` or head count, inputs on different devices, a scale that is not finite and
/// positive, a dropout probability outside `[0, 1)`, key lengths not one per batch row or
/// longer than `n`, a soft-cap that is not finite and positive, ALiBi slopes not one finite
/// slope per head, a relative-position bias table not `[heads, buckets]` or of another
/// dtype or device than `q`, a head dim beyond the kernels of the device
/// ([`DeviceLimit`](SparseAttentionError::DeviceLimit): above 256 on CubeCL devices), a
/// dtype the device's kernels do not run (f64 on CubeCL devices).
///
/// # Example
/// ```
/// use burn::tensor::{Device, Distribution, Tensor};
/// use sparse_attn_core::{AttentionOptions, BlockLayout, pattern::Band, sparse_attention};
///
/// let device = Device::ndarray();
/// let layout = BlockLayout::build(&Band::sliding_window(16).unwrap(), 64, 16, 2).unwrap();
/// let q = Tensor::<4>::random([1, 2, 64, 8], Distribution::Normal(0.0, 1.0), &device);
/// let out = sparse_attention(q.clone(), q.clone(), q.clone(), &layout, AttentionOptions::default()).unwrap();
/// assert_eq!(out.dims(), [1, 2, 64, 8]);
///
/// // One key/value head shared by both query heads, 10% dropout, 40 valid tokens.
/// let kv = Tensor::<4>::random([1, 1, 64, 8], Distribution::Normal(0.0, 1.0), &device);
/// let options = AttentionOptions::default().dropout(0.1, 7).key_lengths([40]);
/// let out = sparse_attention(q, kv.clone(), kv, &layout, options).unwrap();
/// assert_eq!(out.dims(), [1, 2, 64, 8]);
/// ```
pub fn sparse_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let (params, bias) = validate(&q, &k, &v, layout, options)?;
    check_device_limits(&q, layout.block(), &params.mods)?;
    Ok(raw_attention(q, k, v, bias, layout, params))
}

/// [`sparse_attention`] through the portable path: Burn tensor operations over the
/// gathered active key blocks of each query block, on any backend, differentiated by
/// Burn's autodiff op by op.
///
/// This is what a backend without fused kernels runs; it is exposed to compare against
/// (`bench_cpu` times it next to the fused kernels) and to debug a backend. Query blocks
/// are bucketed by degree (the power of two at or above their count of active key blocks)
/// and padded only to their bucket's degree, so its scores take at most twice the active
/// blocks' `block²` elements per head and batch row, also when some rows are dense (causal
/// `all`, global tokens of Longformer/BigBird). The fused kernels keep no scores at all.
///
/// # Errors
/// As [`sparse_attention`], without the device limits of fused kernels.
pub fn sparse_attention_portable(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<Tensor<4>> {
    let (params, bias) = validate(&q, &k, &v, layout, options)?;
    let (out, _lse) = crate::backend::portable::forward_biased::<Dispatch>(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        bias.map(Tensor::into_dispatch),
        layout,
        &params,
    );
    Ok(Tensor::from_dispatch(out))
}

/// Checks shapes, devices, layout and options; returns the ops' parameters and the
/// relative-position bias table.
fn validate(
    q: &Tensor<4>,
    k: &Tensor<4>,
    v: &Tensor<4>,
    layout: &BlockLayout,
    options: AttentionOptions,
) -> Result<(AttentionParams, Option<Tensor<2>>)> {
    let dims = q.dims();
    let [batch, heads, n, d] = dims;
    if let Some(name) = ["batch", "heads", "seq_len", "head_dim"]
        .iter()
        .zip(dims)
        .find_map(|(name, x)| (x == 0).then_some(*name))
    {
        return Err(SparseAttentionError::Zero { name });
    }
    let kv_heads = k.dims()[1];
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(SparseAttentionError::KvHeads { heads, kv_heads });
    }
    let kv_dims = [batch, kv_heads, n, d];
    for (name, t) in [("k", k), ("v", v)] {
        if t.dims() != kv_dims {
            return Err(SparseAttentionError::Shape {
                name,
                got: t.dims().to_vec(),
                expected: format!(
                    "{kv_dims:?}: `q`'s shape {dims:?} with `k`'s {kv_heads} key/value heads"
                ),
            });
        }
        same_dtype_and_device(name, t, q)?;
    }
    check_layout(layout, n, heads)?;
    let scale = options.scale.unwrap_or(1.0 / (d as f64).sqrt());
    if !(scale.is_finite() && scale > 0.0) {
        return Err(SparseAttentionError::Scale(scale));
    }
    let dropout = match options.dropout {
        None => None,
        Some((p, _)) if !(0.0..1.0).contains(&p) => {
            return Err(SparseAttentionError::Probability {
                name: "dropout",
                got: p,
            });
        }
        Some((p, seed)) => DropoutMask::new(p, seed),
    };
    let (mods, bias) = score_mods(&options, heads, q)?;
    let key_lengths = match options.key_lengths {
        None => None,
        Some(lengths) => {
            if lengths.len() != batch {
                return Err(SparseAttentionError::KeyLengths {
                    got: lengths.len(),
                    batch,
                });
            }
            if let Some((row, &len)) = lengths.iter().enumerate().find(|(_, len)| **len > n) {
                return Err(SparseAttentionError::KeyLength {
                    row,
                    len,
                    seq_len: n,
                });
            }
            Some(lengths.into())
        }
    };
    let params = AttentionParams {
        scale,
        dropout,
        key_lengths,
        mods,
    };
    Ok((params, bias))
}

/// Checks the score modifiers of `options` for a call on `q` (its query heads, dtype and
/// device): the soft-cap finite and positive, one finite ALiBi slope per head (the standard
/// ones for [`Alibi::Standard`]), a relative-position bias table `[heads, buckets]` of
/// `q`'s dtype and device. Returns the modifiers and the table.
pub(crate) fn score_mods(
    options: &AttentionOptions,
    heads: usize,
    q: &Tensor<4>,
) -> Result<(ScoreModParams, Option<Tensor<2>>)> {
    let (softcap, alibi) = (options.softcap, options.alibi.clone());
    if let Some(cap) = softcap
        && !(cap.is_finite() && cap > 0.0)
    {
        return Err(SparseAttentionError::SoftCap(cap));
    }
    let alibi = match alibi {
        None => None,
        Some(Alibi::Standard) => Some(crate::alibi_slopes(heads).into()),
        Some(Alibi::Slopes(slopes)) => {
            if slopes.len() != heads || slopes.iter().any(|s| !s.is_finite()) {
                return Err(SparseAttentionError::AlibiSlopes { got: slopes, heads });
            }
            Some(slopes.into())
        }
    };
    let (relative, table) = match &options.relative_bias {
        None => (None, None),
        Some(RelativePositionBias { table, buckets }) => {
            let want = [heads, buckets.count()];
            if table.dims() != want {
                return Err(SparseAttentionError::BiasTable {
                    got: table.dims().to_vec(),
                    heads,
                    buckets: buckets.count(),
                });
            }
            same_dtype_and_device("relative_bias.table", table, q)?;
            (Some(buckets.clone()), Some(table.clone()))
        }
    };
    let mods = ScoreModParams {
        softcap,
        alibi,
        relative,
    };
    Ok((mods, table))
}

/// Checks the limits of the kernels that will run on `q`'s device, before anything is
/// launched: on a CubeCL device, f32, f16 or bf16 inputs, head dims up to
/// [`sparse_attn_wgpu::MAX_HEAD_DIM`], and what [`sparse_attn_wgpu::check_problem`] asks of
/// the device (dtypes it has, shared memory and units per cube, 32-bit indexing), and at
/// most [`sparse_attn_wgpu::MAX_BIAS_BUCKETS`] buckets of a relative-position bias.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub(crate) fn check_device_limits(
    q: &Tensor<4>,
    block: usize,
    mods: &ScoreModParams,
) -> Result<()> {
    use burn::backend::DispatchDevice;
    use burn::tensor::DType;
    let DispatchDevice::Cube(device) = q.device().as_dispatch().clone().inner() else {
        return Ok(());
    };
    let [batch, heads, seq_len, head_dim] = q.dims();
    let max = sparse_attn_wgpu::MAX_HEAD_DIM;
    if head_dim > max {
        return Err(SparseAttentionError::DeviceLimit {
            what: "head dim",
            got: head_dim,
            max,
            backend: "CubeCL",
        });
    }
    if let Some(buckets) = &mods.relative
        && buckets.count() > sparse_attn_wgpu::MAX_BIAS_BUCKETS
    {
        return Err(SparseAttentionError::DeviceLimit {
            what: "relative-position buckets",
            got: buckets.count(),
            max: sparse_attn_wgpu::MAX_BIAS_BUCKETS,
            backend: "CubeCL",
        });
    }
    if !matches!(q.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        return Err(SparseAttentionError::DType {
            got: format!("{:?}", q.dtype()),
            expected: "f32, f16 or bf16 on CubeCL devices",
        });
    }
    let shape = sparse_attn_wgpu::AttentionShape {
        batch,
        heads,
        kv_heads: heads,
        seq_len,
        head_dim,
    };
    let dtype = burn::backend::cubecl::dtype_to_elem_type(q.dtype());
    sparse_attn_wgpu::check_problem(&device.client(), dtype, &shape, block)?;
    Ok(())
}

/// CPU backends have no limit beyond those of the input's validity.
#[cfg(not(any(feature = "wgpu", feature = "cuda")))]
pub(crate) fn check_device_limits(
    _q: &Tensor<4>,
    _block: usize,
    _mods: &ScoreModParams,
) -> Result<()> {
    Ok(())
}

/// `t` (argument `name`) has `q`'s dtype and device.
pub(crate) fn same_dtype_and_device<const D: usize>(
    name: &'static str,
    t: &Tensor<D>,
    q: &Tensor<4>,
) -> Result<()> {
    if t.dtype() != q.dtype() {
        return Err(SparseAttentionError::DTypeMismatch {
            name,
            got: format!("{:?}", t.dtype()),
            expected: format!("{:?}", q.dtype()),
        });
    }
    if t.device() != q.device() {
        return Err(SparseAttentionError::DeviceMismatch {
            name,
            got: format!("{:?}", t.device()),
            expected: format!("{:?}", q.device()),
        });
    }
    Ok(())
}

/// Checks that `layout` was built for `n` tokens and `heads` heads.
pub(crate) fn check_layout(layout: &BlockLayout, n: usize, heads: usize) -> Result<()> {
    if layout.seq_len() != n {
        return Err(SparseAttentionError::LayoutMismatch {
            what: "seq_len",
            layout: layout.seq_len(),
            input: n,
        });
    }
    if layout.heads() != heads {
        return Err(SparseAttentionError::LayoutMismatch {
            what: "heads",
            layout: layout.heads(),
            input: heads,
        });
    }
    Ok(())
}

/// The backend op on validated tensors (token order; the backend applies the layout's order):
/// the biased op with a relative-position bias table.
fn raw_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    bias: Option<Tensor<2>>,
    layout: &BlockLayout,
    params: AttentionParams,
) -> Tensor<4> {
    let (q, k, v) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    Tensor::from_dispatch(match bias {
        None => {
            <Dispatch as SparseAttentionBackend>::sparse_attention(q, k, v, layout.clone(), params)
        }
        Some(bias) => <Dispatch as SparseAttentionBackend>::sparse_attention_biased(
            q,
            k,
            v,
            bias.into_dispatch(),
            layout.clone(),
            params,
        ),
    })
}

//! Typed errors for everything built from user input.

use thiserror::Error;

/// Everything that can be wrong with the inputs of a public entry point.
///
/// Each variant names what was expected. Internal invariant breaks (a bug in this crate,
/// not bad input) panic with a precise message instead.
///
/// New variants may be added in minor releases: match with a wildcard arm.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum SparseAttentionError {
    /// The block size is outside the supported range.
    #[error("block size {got} is not supported: expected a block size between {min} and {max}")]
    BlockSize {
        /// Block size given.
        got: usize,
        /// Smallest supported block size.
        min: usize,
        /// Largest supported block size.
        max: usize,
    },
    /// A pattern parameter makes no sense.
    #[error("invalid `{pattern}` pattern: {reason}")]
    InvalidPattern {
        /// Pattern name.
        pattern: &'static str,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A tensor does not have the expected shape.
    #[error("`{name}` has shape {got:?}, expected {expected}")]
    Shape {
        /// Argument name.
        name: &'static str,
        /// Shape given.
        got: Vec<usize>,
        /// What was expected.
        expected: String,
    },
    /// The number of heads does not divide the embedding width.
    #[error(
        "n_embd = {n_embd} is not divisible by heads = {heads}: expected heads to divide n_embd"
    )]
    HeadsDivide {
        /// Embedding width.
        n_embd: usize,
        /// Number of heads.
        heads: usize,
    },
    /// A zero count where a positive one is needed.
    #[error("`{name}` must be positive, got 0")]
    Zero {
        /// Argument name.
        name: &'static str,
    },
    /// The layout was built for another problem.
    #[error("layout was built for {what} = {layout}, but the input has {what} = {input}")]
    LayoutMismatch {
        /// Which quantity differs (`seq_len`, `heads`, `block`).
        what: &'static str,
        /// The layout's value.
        layout: usize,
        /// The input's value.
        input: usize,
    },
    /// Inputs live on different devices.
    #[error("`{name}` is on device {got}, expected the device of `q` ({expected})")]
    DeviceMismatch {
        /// Argument name.
        name: &'static str,
        /// Its device.
        got: String,
        /// The device of `q`.
        expected: String,
    },
    /// The layout has more active blocks than the kernels can index.
    #[error("layout has {blocks} active blocks, more than the supported {max}")]
    TooManyBlocks {
        /// Active blocks.
        blocks: usize,
        /// Limit.
        max: usize,
    },
    /// The attention scale is not a finite positive number.
    #[error("scale must be finite and positive, got {0}")]
    Scale(f64),
    /// The soft-capping bound is not a finite positive number.
    #[error("soft-cap must be finite and positive, got {0}")]
    SoftCap(f64),
    /// The ALiBi slopes are not one finite slope per query head.
    #[error("ALiBi slopes {got:?}: expected {heads} finite slopes, one per query head")]
    AlibiSlopes {
        /// Slopes given.
        got: Vec<f64>,
        /// Query heads of the input.
        heads: usize,
    },
    /// A relative-position bucketing outside its invariants.
    #[error("{0}")]
    RelativeBuckets(#[from] sparse_attn_kernel_types::BucketsError),
    /// A relative-position bias table of the wrong shape.
    #[error(
        "relative-position bias table of shape {got:?}: expected [{heads}, {buckets}] (query heads, buckets)"
    )]
    BiasTable {
        /// The table's shape.
        got: Vec<usize>,
        /// Query heads of the input.
        heads: usize,
        /// Buckets of the bucketing.
        buckets: usize,
    },
    /// A sequence longer than a layer or model was configured for.
    #[error("sequence of {len} tokens is longer than the configured maximum of {max}")]
    SequenceTooLong {
        /// Tokens in the input.
        len: usize,
        /// The configured `max_seq_len`.
        max: usize,
    },
    /// A probability (dropout) outside `[0, 1)`.
    #[error("{name} must be a probability in [0, 1), got {got}")]
    Probability {
        /// Which parameter.
        name: &'static str,
        /// The value given.
        got: f64,
    },
    /// The key/value head count does not divide the query head count.
    #[error(
        "k and v have {kv_heads} heads, q has {heads}: expected a key/value head count that divides the query head count"
    )]
    KvHeads {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },
    /// Key lengths given for another number of batch rows.
    #[error("{got} key lengths given for a batch of {batch}: expected one per batch row")]
    KeyLengths {
        /// Lengths given.
        got: usize,
        /// Batch size.
        batch: usize,
    },
    /// A key length longer than the sequence.
    #[error(
        "key length {len} of batch row {row} is longer than the sequence: expected at most {seq_len}"
    )]
    KeyLength {
        /// Batch row.
        row: usize,
        /// Its length.
        len: usize,
        /// Sequence length.
        seq_len: usize,
    },
    /// An unknown mode name.
    #[error("unknown attention mode `{0}`: expected one of all, local, strided, fixed")]
    UnknownMode(String),
    /// The input tensor uses a dtype this backend cannot run.
    #[error("dtype {got} is not supported here: expected {expected}")]
    DType {
        /// The dtype given.
        got: String,
        /// What is supported.
        expected: &'static str,
    },
    /// The device's kernels cannot run this problem (a limit of the backend, not of the
    /// input's validity): e.g. a head dim beyond what the CubeCL kernels hold in registers.
    #[error("{what} {got} is beyond what the {backend} kernels support: expected at most {max}")]
    DeviceLimit {
        /// The quantity over the limit (`"head dim"`).
        what: &'static str,
        /// Its value.
        got: usize,
        /// The limit.
        max: usize,
        /// The backend whose kernels have the limit.
        backend: &'static str,
    },
    /// Inputs of different dtypes.
    #[error("`{name}` is {got}, expected the dtype of `q` ({expected}): cast it first")]
    DTypeMismatch {
        /// Argument name.
        name: &'static str,
        /// Its dtype.
        got: String,
        /// The dtype of `q`.
        expected: String,
    },
    /// A module given to a config does not have the config's dimensions.
    #[error("the config has {what} = {config}, but the given module has {what} = {module}")]
    ConfigMismatch {
        /// Which quantity differs (`d_model`, `n_heads`, `n_kv_heads`).
        what: &'static str,
        /// The config's value.
        config: usize,
        /// The module's value.
        module: usize,
    },
    /// A combination of options that cannot be served.
    #[error("{what} is not supported: {expected}")]
    Unsupported {
        /// The combination asked for.
        what: &'static str,
        /// What would be supported instead.
        expected: &'static str,
    },
    /// An index outside what it indexes (a head of a layout).
    #[error("{what} {got} is out of range: expected below {len}")]
    OutOfRange {
        /// What was indexed (`head`).
        what: &'static str,
        /// The index given.
        got: usize,
        /// The number of valid indices.
        len: usize,
    },
    /// Decode rows given for another number of batch rows.
    #[error("decode `{what}` has {got} entries, expected one per batch row ({batch})")]
    DecodeRows {
        /// Which list (`first`, `valid`).
        what: &'static str,
        /// Entries given.
        got: usize,
        /// Batch size.
        batch: usize,
    },
    /// A batch row marks more new rows valid than the call has.
    #[error("batch row {row} marks {valid} new rows valid, but the call has {queries} query rows")]
    ValidRows {
        /// Batch row.
        row: usize,
        /// Its valid rows.
        valid: usize,
        /// Query rows of the call.
        queries: usize,
    },
    /// New tokens past the end of a key/value cache.
    #[error(
        "batch row {row} would fill the key/value cache up to token {end}, but it holds {capacity}: \
         use a larger capacity (or a ring buffer for a window pattern)"
    )]
    CacheFull {
        /// Batch row.
        row: usize,
        /// Tokens the row would hold after the call.
        end: usize,
        /// Tokens the cache holds.
        capacity: usize,
    },
    /// A key/value cache made for another layer, batch, dtype or device.
    #[error(
        "the key/value cache has {what} {cache}, but the call has {layer}: make the cache from this layer for this input"
    )]
    CacheMismatch {
        /// What differs.
        what: &'static str,
        /// The cache's value.
        cache: String,
        /// The call's value.
        layer: String,
    },
    /// A CubeCL device cannot run the kernels for this problem (found before any launch).
    #[cfg(any(feature = "wgpu", feature = "cuda"))]
    #[error(transparent)]
    Kernel(#[from] sparse_attn_wgpu::KernelError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = SparseAttentionError> = std::result::Result<T, E>;

pub(crate) fn invalid(pattern: &'static str, reason: impl Into<String>) -> SparseAttentionError {
    SparseAttentionError::InvalidPattern {
        pattern,
        reason: reason.into(),
    }
}

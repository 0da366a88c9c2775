//! A serializable description of a built-in pattern.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use burn::config::Config;
use sparse_attn_core::pattern::{
    Band, BigBird, BigBirdConfig, Dilated, DynPattern, Fixed, Longformer, PerHead, Streaming,
    Strided, Union, VariableWindows,
};
use sparse_attn_core::{BlockLayout, Result, SparseAttentionError};

/// Which sparsity pattern a layer uses; every built-in pattern, serializable with the
/// model's config.
#[derive(Config, Debug, PartialEq, Eq, Hash)]
pub enum PatternConfig {
    /// Causal dense (`all`).
    All,
    /// Bidirectional dense.
    Dense,
    /// `local`: the query and `ctx - 1` keys before it.
    Local {
        /// `local_attn_ctx`.
        ctx: usize,
    },
    /// `strided` with period `stride` (regrouped token order).
    Strided {
        /// `local_attn_ctx`.
        stride: usize,
    },
    /// The paper's strided pattern: `local(ctx)` ∪ `strided(ctx)`.
    PaperStrided {
        /// `local_attn_ctx`.
        ctx: usize,
    },
    /// `fixed` in the original parameterisation (summary = `vertsize * block_size`).
    Fixed {
        /// `local_attn_ctx`.
        local_ctx: usize,
        /// Head groups.
        num_verts: usize,
        /// Summary blocks per group.
        vertsize: usize,
    },
    /// Causal sliding window of `window` keys.
    SlidingWindow {
        /// Keys per query, the query included.
        window: usize,
    },
    /// Bidirectional window `|i - j| <= radius`.
    BidirectionalWindow {
        /// Reach on each side.
        radius: usize,
    },
    /// Dilated window.
    Dilated {
        /// Keys per side.
        window: usize,
        /// Spacing.
        dilation: usize,
        /// Causal or bidirectional.
        causal: bool,
    },
    /// Longformer: window and global tokens.
    Longformer {
        /// Keys per side.
        window: usize,
        /// Global tokens.
        globals: Vec<usize>,
        /// Causal or bidirectional.
        causal: bool,
    },
    /// BigBird: window, global tokens and seeded random blocks.
    BigBird {
        /// Keys per side.
        window: usize,
        /// Global tokens.
        globals: Vec<usize>,
        /// Random blocks per query block.
        random_blocks: usize,
        /// Random block size in tokens.
        random_block: usize,
        /// Seed.
        seed: u64,
        /// Causal or bidirectional.
        causal: bool,
    },
    /// Attention sinks plus a causal window.
    Streaming {
        /// Sink tokens.
        sinks: usize,
        /// Window keys.
        window: usize,
    },
    /// Consecutive windows of the given sizes (the last repeats).
    VariableWindows {
        /// Window sizes.
        sizes: Vec<usize>,
        /// Causal or not.
        causal: bool,
    },
    /// One pattern per head.
    PerHead(Vec<PatternConfig>),
    /// A pattern defined outside this crate and registered under `name` with
    /// [`register_pattern`] (the config stores the name; register it again before
    /// building a model from a saved config).
    Custom {
        /// The registered name.
        name: String,
    },
}

/// Builds a custom pattern for `(seq_len, block)`; see [`register_pattern`].
pub type PatternFactory = Arc<dyn Fn(usize, usize) -> Result<DynPattern> + Send + Sync>;

fn registry() -> &'static RwLock<HashMap<String, PatternFactory>> {
    static REGISTRY: OnceLock<RwLock<HashMap<String, PatternFactory>>> = OnceLock::new();
    REGISTRY.get_or_init(RwLock::default)
}

type LayoutKey = (PatternConfig, usize, usize, usize);

fn layouts() -> &'static Mutex<HashMap<LayoutKey, BlockLayout>> {
    static CACHE: OnceLock<Mutex<HashMap<LayoutKey, BlockLayout>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// Makes a pattern of your own usable as [`PatternConfig::Custom`] `{ name }` in every
/// layer, model and config of this crate. `factory(seq_len, block)` builds it; registering
/// a name again replaces the factory (and forgets layouts built by the old one).
///
/// # Example
/// ```
/// use std::sync::Arc;
/// use sparse_attn_core::pattern::FnPattern;
/// use sparse_attn_nn::{PatternConfig, register_pattern};
///
/// // Each query sees itself and every key an even distance before it.
/// register_pattern("even", |_seq_len, _block| {
///     Ok(Arc::new(FnPattern::new("even", false, |_h, i, j| j <= i && (i - j) % 2 == 0)))
/// });
/// let layout = PatternConfig::Custom { name: "even".into() }.layout(64, 16, 1).unwrap();
/// assert!(layout.allows(0, 10, 4) && !layout.allows(0, 10, 3));
/// ```
pub fn register_pattern(
    name: impl Into<String>,
    factory: impl Fn(usize, usize) -> Result<DynPattern> + Send + Sync + 'static,
) {
    let name = name.into();
    layouts()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(pattern, ..), _| !pattern.mentions_custom(&name));
    registry()
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name, Arc::new(factory));
}

fn arc(p: impl sparse_attn_core::Pattern + 'static) -> DynPattern {
    Arc::new(p)
}

impl PatternConfig {
    /// The pattern for sequences of `seq_len` tokens and blocks of `block` tokens.
    ///
    /// # Errors
    /// Invalid parameters (a zero window, `fixed` summaries beyond the chunk, ...).
    pub fn build(&self, seq_len: usize, block: usize) -> Result<DynPattern> {
        Ok(match self {
            Self::All => arc(Band::causal()),
            Self::Dense => arc(Band::dense()),
            Self::Local { ctx } => arc(Band::local(*ctx)?),
            Self::Strided { stride } => arc(Strided::new(*stride)?),
            Self::PaperStrided { ctx } => arc(Union::new(vec![
                arc(Band::local(*ctx)?),
                arc(Strided::new(*ctx)?),
            ])?),
            Self::Fixed {
                local_ctx,
                num_verts,
                vertsize,
            } => arc(Fixed::sparse_transformer(
                *local_ctx, *num_verts, *vertsize, block,
            )?),
            Self::SlidingWindow { window } => arc(Band::sliding_window(*window)?),
            Self::BidirectionalWindow { radius } => arc(Band::bidirectional_window(*radius)),
            Self::Dilated {
                window,
                dilation,
                causal,
            } => arc(Dilated::new(*window, *dilation, *causal)?),
            Self::Longformer {
                window,
                globals,
                causal,
            } => arc(Longformer::new(*window, globals.clone(), *causal)?),
            Self::BigBird {
                window,
                globals,
                random_blocks,
                random_block,
                seed,
                causal,
            } => arc(BigBird::new(
                BigBirdConfig {
                    window: *window,
                    global_tokens: globals.clone(),
                    random_blocks: *random_blocks,
                    random_block: *random_block,
                    seed: *seed,
                    causal: *causal,
                },
                seq_len,
            )?),
            Self::Streaming { sinks, window } => arc(Streaming::new(*sinks, *window)?),
            Self::VariableWindows { sizes, causal } => {
                arc(VariableWindows::new(sizes.clone(), *causal)?)
            }
            Self::PerHead(parts) => {
                let parts = parts
                    .iter()
                    .map(|p| p.build(seq_len, block))
                    .collect::<Result<Vec<_>>>()?;
                arc(PerHead::new(parts)?)
            }
            Self::Custom { name } => {
                let factory = registry()
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(name)
                    .cloned()
                    .ok_or_else(|| SparseAttentionError::InvalidPattern {
                        pattern: "custom",
                        reason: format!(
                            "no pattern is registered under `{name}`: call \
                             sparse_attn_nn::register_pattern(\"{name}\", ...) first"
                        ),
                    })?;
                factory(seq_len, block)?
            }
        })
    }

    /// Whether this config is, or contains, the custom pattern `name`.
    fn mentions_custom(&self, name: &str) -> bool {
        match self {
            Self::Custom { name: own } => own == name,
            Self::PerHead(parts) => parts.iter().any(|p| p.mentions_custom(name)),
            _ => false,
        }
    }

    /// The layout for `(seq_len, block, heads)`, built once per process and shared.
    ///
    /// # Errors
    /// As [`PatternConfig::build`] and [`BlockLayout::build`].
    pub fn layout(&self, seq_len: usize, block: usize, heads: usize) -> Result<BlockLayout> {
        let key = (self.clone(), seq_len, block, heads);
        if let Some(layout) = layouts()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(layout.clone());
        }
        let layout =
            BlockLayout::build(self.build(seq_len, block)?.as_ref(), seq_len, block, heads)?;
        layouts()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, layout.clone());
        Ok(layout)
    }
}

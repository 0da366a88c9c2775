//! Layouts cached per sequence length for one `(pattern, block, heads)`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::Result;
use crate::layout::BlockLayout;
use crate::pattern::Pattern;

/// Builds the layout of one pattern, block size and head count once per sequence length.
///
/// Cloning shares the cache.
#[derive(Clone)]
pub struct LayoutCache {
    pattern: Arc<dyn Pattern>,
    block: usize,
    heads: usize,
    built: Arc<Mutex<HashMap<usize, BlockLayout>>>,
}

impl std::fmt::Debug for LayoutCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayoutCache")
            .field("pattern", &self.pattern.name())
            .field("block", &self.block)
            .field("heads", &self.heads)
            .finish_non_exhaustive()
    }
}

impl LayoutCache {
    /// A cache for `pattern` with blocks of `block` tokens and `heads` heads.
    pub fn new(pattern: Arc<dyn Pattern>, block: usize, heads: usize) -> Self {
        Self {
            pattern,
            block,
            heads,
            built: Arc::default(),
        }
    }

    /// The layout for `seq_len` tokens, built on first use.
    ///
    /// # Errors
    /// As [`BlockLayout::build`].
    pub fn get(&self, seq_len: usize) -> Result<BlockLayout> {
        let mut built = self
            .built
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(layout) = built.get(&seq_len) {
            return Ok(layout.clone());
        }
        let layout = BlockLayout::build(self.pattern.as_ref(), seq_len, self.block, self.heads)?;
        built.insert(seq_len, layout.clone());
        Ok(layout)
    }

    /// The pattern.
    pub fn pattern(&self) -> &Arc<dyn Pattern> {
        &self.pattern
    }
}

//! The BigBird shape the CPU benchmarks share (`bench_cpu`'s `bigbird` rows and
//! `layout_bench`'s BigBird row), so their figures describe one pattern.

use sparse_attn::SparseAttentionError;
use sparse_attn::pattern::{BigBird, BigBirdConfig};

/// Causal BigBird for `n` tokens: a window of 128, tokens 0 and 1 global, 2 random blocks
/// of 64 tokens per query block, seed 0.
pub fn bench_bigbird(n: usize) -> Result<BigBird, SparseAttentionError> {
    BigBird::new(
        BigBirdConfig {
            window: 128,
            global_tokens: vec![0, 1],
            random_blocks: 2,
            random_block: 64,
            seed: 0,
            causal: true,
        },
        n,
    )
}

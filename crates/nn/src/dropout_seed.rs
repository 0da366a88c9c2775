//! Seeds of the layers' attention dropout.
//!
//! The kernels draw their dropout mask from a counter-based generator keyed by a seed; a
//! layer needs a fresh seed at every training forward. Seeds come from one process-wide
//! sequence (SplitMix64 over an atomic counter): deterministic for a given call order, so
//! a training run repeats exactly, and reset with [`seed_attention_dropout`]. Drawing them
//! on the host costs nothing and, unlike reading a random tensor back, never waits for a
//! GPU.

use std::sync::atomic::{AtomicU64, Ordering};

/// The counter of the sequence.
static COUNTER: AtomicU64 = AtomicU64::new(0x5eed_a77e_0000_0000);

/// Restarts the sequence of attention-dropout seeds at `seed`: the following training
/// forwards draw the same masks as after any other call with the same `seed`.
pub fn seed_attention_dropout(seed: u64) {
    COUNTER.store(seed, Ordering::Relaxed);
}

/// The next seed of the sequence.
pub(crate) fn next_dropout_seed() -> u64 {
    let mut z = COUNTER
        .fetch_add(1, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

//! The per-call options that `bench_cpu --extras` and `bench_gpu --extras` time beside the
//! plain kernels, so both benchmarks' tables have the same columns.

use sparse_attn::AttentionOptions;

/// The options timed beside the plain attention of an `n`-token row: dropout 0.1, key
/// padding of one token (every tile then checks validity), soft-capping at 30 (Gemma's
/// bound) and ALiBi at the standard slopes.
pub fn extra_options(n: usize) -> Vec<(&'static str, AttentionOptions)> {
    let plain = AttentionOptions::default();
    vec![
        ("dropout 0.1", plain.clone().dropout(0.1, 7)),
        ("padded (n - 1)", plain.clone().key_lengths([n - 1])),
        ("softcap 30", plain.clone().softcap(30.0)),
        ("ALiBi", plain.alibi()),
    ]
}

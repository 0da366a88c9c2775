//! The per-call options that `bench_cpu --extras` and `bench_gpu --extras` time beside the
//! plain kernels, so both benchmarks' tables have the same columns.

use burn::tensor::{FloatDType, Tensor};
use sparse_attn::{AttentionOptions, RelativeBuckets};

/// One timed option: its column name, the options, and whether a call adds a learnable
/// relative-position bias table on the inputs' device ([`for_inputs`]).
pub struct ExtraOption {
    /// Column name.
    pub name: &'static str,
    /// The options besides the bias table.
    pub options: AttentionOptions,
    /// Whether calls add T5's relative-position bias (32 buckets up to 128).
    pub relative_bias: bool,
}

impl ExtraOption {
    /// The options of a call on `q`: with the relative-position bias, a `[heads, 32]` table
    /// of `q`'s dtype and device (tracked on an autodiff device, so that the backward pass
    /// computes its gradient).
    pub fn for_inputs(&self, q: &Tensor<4>) -> AttentionOptions {
        if !self.relative_bias {
            return self.options.clone();
        }
        let device = q.device();
        let buckets = RelativeBuckets::new(32, 128, false).expect("T5's bucketing");
        let table = Tensor::<2>::zeros([q.dims()[1], buckets.count()], &device)
            .cast(FloatDType::from(q.dtype()));
        let table = if device.is_autodiff() {
            table.require_grad()
        } else {
            table
        };
        self.options.clone().relative_bias(table, buckets)
    }
}

/// The options timed beside the plain attention of an `n`-token row: dropout 0.1, key
/// padding of one token (every tile then checks validity), soft-capping at 30 (Gemma's
/// bound), ALiBi at the standard slopes and T5's learnable relative-position bias.
pub fn extra_options(n: usize) -> Vec<ExtraOption> {
    let plain = AttentionOptions::default();
    let option = |name, options| ExtraOption {
        name,
        options,
        relative_bias: false,
    };
    vec![
        option("dropout 0.1", plain.clone().dropout(0.1, 7)),
        option("padded (n - 1)", plain.clone().key_lengths([n - 1])),
        option("softcap 30", plain.clone().softcap(30.0)),
        option("ALiBi", plain.clone().alibi()),
        ExtraOption {
            name: "relative bias (32 buckets)",
            options: plain,
            relative_bias: true,
        },
    ]
}

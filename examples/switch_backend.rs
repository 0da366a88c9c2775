//! The same model on every backend this build enables: Cargo features pick the backends
//! (`ndarray` by default; `--features flex,wgpu` adds the others), the device picks one at
//! run time, and the code does not change.
//!
//! `cargo run --release --example switch_backend --features flex,wgpu`
//!
//! One set of weights (saved as a Burn record on the first backend, loaded on the others)
//! runs a forward and a backward pass on each backend; the losses agree.

use std::time::Instant;

use burn::module::Module;
use burn::store::ModuleRecord;
use burn::tensor::{Device, Int, Tensor, TensorData};
use sparse_attn::backends;
use sparse_attn::nn::{PatternConfig, SparseTransformer, SparseTransformerConfig};

/// Mean next-byte loss of `text` and the norm of the gradient of the token embedding.
fn step(model: &SparseTransformer, text: &[u8], device: &Device) -> anyhow::Result<(f32, f32)> {
    let ids: Vec<i64> = text.iter().map(|&b| b as i64).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, text.len()]), device);
    let loss = model.loss(tokens)?;
    let grads = loss.clone().backward();
    let embedding = model.tokens.weight.val().grad(&grads).expect("trained");
    Ok((
        loss.into_scalar(),
        embedding.powi_scalar(2).sum().sqrt().into_scalar(),
    ))
}

fn main() -> anyhow::Result<()> {
    let config = SparseTransformerConfig::new(256, 64, 4, 2, 256, PatternConfig::Local { ctx: 32 })
        .with_block_size(16);
    let text = b"Sparse attention lets each token attend to a few others: local windows, \
                 strided columns, fixed summaries. The layout is built once.";
    let mut weights: Option<burn::tensor::Bytes> = None;
    for name in backends::BACKENDS {
        let device = backends::device(name)?.autodiff();
        let mut model = config.init(&device)?;
        match &weights {
            None => weights = Some(model.clone().into_record().into_bytes()?),
            Some(bytes) => {
                let record = ModuleRecord::from_bytes(bytes.clone())?;
                model = model.try_load_record(record)?;
            }
        }
        let start = Instant::now();
        let (loss, grad) = step(&model, text, &device)?;
        println!(
            "{name:>8}: loss {loss:.6}, |grad embedding| {grad:.6}, {:.1} ms (first call, includes warm-up)",
            start.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}

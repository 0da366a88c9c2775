//! A sparsity pattern of your own, defined outside the library, used in the trainable
//! layer for a forward and a backward pass, and shown as a picture.
//!
//! `cargo run --release --example custom_pattern`
//!
//! The pattern is the Sparse Transformer's 2-d factorisation for an image of `width`
//! columns flattened row by row: each pixel sees the earlier pixels of its own row and of
//! its own column. Implementing [`Pattern`] takes `name` and `allows`; everything else
//! (block layout, kernels, backward) comes from the library.

use std::sync::Arc;

use burn::tensor::{Device, Distribution, Tensor};
use sparse_attn::nn::{MultiHeadSparseAttentionConfig, PatternConfig, register_pattern};
use sparse_attn::{BlockLayout, Pattern};

// ---- the whole pattern: 17 lines ----
/// Causal row-and-column attention over an image `width` pixels wide.
#[derive(Debug)]
struct RowColumn {
    width: usize,
}

impl Pattern for RowColumn {
    fn name(&self) -> String {
        format!("row-column(width={})", self.width)
    }

    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        let same_row = i / self.width == j / self.width;
        let same_column = i % self.width == j % self.width;
        j <= i && (same_row || same_column)
    }
}
// ---- end of the pattern ----

// burn-ndarray is deprecated upstream (0.22) but is our default backend.
#[allow(deprecated)]
fn main() -> Result<(), sparse_attn::SparseAttentionError> {
    let (width, heads, d_model, block) = (32, 4, 64, 16);
    let n = width * width; // a 32 x 32 image

    let picture = BlockLayout::build(&RowColumn { width }, n, block, 1)?;
    println!("{}", picture.picture(0, 64)?);

    register_pattern("row-column", move |_seq_len, _block| {
        Ok(Arc::new(RowColumn { width }))
    });
    let device = Device::ndarray().autodiff();
    let layer = MultiHeadSparseAttentionConfig::new(
        d_model,
        heads,
        PatternConfig::Custom {
            name: "row-column".into(),
        },
    )
    .with_block_size(block)
    .init(&device)?;

    let pixels = Tensor::<3>::random([2, n, d_model], Distribution::Normal(0.0, 1.0), &device);
    let out = layer.forward(pixels)?;
    let grads = out.powi_scalar(2).mean().backward();
    let weight_grad = layer
        .query
        .weight
        .val()
        .grad(&grads)
        .expect("query is trained");
    println!(
        "forward {:?} -> backward: |d loss / d W_query| = {:.4e}",
        [2, n, d_model],
        weight_grad.powi_scalar(2).sum().sqrt().into_scalar::<f32>()
    );
    Ok(())
}

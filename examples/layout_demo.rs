//! Prints the block layouts of the Sparse Transformer modes and checks that
//! `blocksparse_attention_impl` matches the dense masked `attention_impl`.
//!
//! `cargo run --release --example layout_demo`

use burn::tensor::{Device, Distribution, Tensor};
use sparse_attn::{
    AttnMode, ModeParams, SparseAttention, attention_impl, blocksparse_attention_impl,
};

// burn-ndarray is deprecated upstream (0.22) but is our default backend.
#[allow(deprecated)]
fn main() -> Result<(), sparse_attn::SparseAttentionError> {
    let (n, heads, n_embd, block) = (1024, 4, 256, 32);
    let device = Device::ndarray();
    let x = || Tensor::<3>::random([1, n, n_embd], Distribution::Normal(0.0, 1.0), &device);
    let (q, k, v) = (x(), x(), x());
    let modes = [
        (AttnMode::All, None, 1, 1),
        (AttnMode::Local, Some(128), 1, 1),
        (AttnMode::Strided, Some(32), 1, 1),
        (AttnMode::Fixed, Some(128), 4, 1),
    ];
    for (mode, ctx, num_verts, vertsize) in modes {
        let params = ModeParams {
            local_attn_ctx: ctx,
            blocksize: block,
            num_verts,
            vertsize,
        };
        let layout = SparseAttention::new(heads, mode, params)?.layout(n)?;
        println!("{}", layout.picture(heads - 1, 32)?);
        let sparse = blocksparse_attention_impl(
            q.clone(),
            k.clone(),
            v.clone(),
            heads,
            mode,
            ctx,
            block,
            num_verts,
            vertsize,
        )?;
        if mode == AttnMode::Fixed {
            println!("fixed: the original dense attention_impl has no fixed mode\n");
            continue;
        }
        let dense = attention_impl(q.clone(), k.clone(), v.clone(), heads, mode, ctx)?;
        let diff = (sparse - dense).abs().max().into_scalar::<f32>();
        println!("{mode:?}: max |blocksparse - dense| = {diff:e}\n");
    }
    Ok(())
}

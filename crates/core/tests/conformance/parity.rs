//! Parity with the original Sparse Transformer at the sizes: n = 1024, b = 32,
//! 4 heads, n_embd = 256; `blocksparse_attention_impl` vs the f64 reference and (except
//! `fixed`, which the original dense path does not offer) vs `attention_impl`.

use burn::tensor::Tensor;
use sparse_attn_core::reference::{RefShape, reference_forward};
use sparse_attn_core::{AttnMode, ModeParams, attention_impl, blocksparse_attention_impl};

use crate::common::{Rng, assert_close, to_tensor};

/// `[B, n, E]` <-> `[B, H, n, d]` on host buffers.
fn split(x: &[f64], n: usize, heads: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; x.len()];
    for i in 0..n {
        for h in 0..heads {
            for t in 0..d {
                out[(h * n + i) * d + t] = x[i * heads * d + h * d + t];
            }
        }
    }
    out
}

#[test]
fn original_modes_match_reference() {
    let (n, heads, e) = (1024, 4, 256);
    let d = e / heads;
    let device = burn::tensor::Device::ndarray();
    let mut rng = Rng::new(2019);
    let [q, k, v] = [(); 3].map(|_| rng.normals(n * e));
    let cases = [
        (AttnMode::All, None, 1, 1),
        (AttnMode::Local, Some(32), 1, 1),
        (AttnMode::Strided, Some(32), 1, 1),
        (AttnMode::Fixed, Some(128), 4, 1),
    ];
    let tensor = |x: &[f64]| -> Tensor<3> { to_tensor(x, [1, n, e], &device) };
    for (mode, ctx, num_verts, vertsize) in cases {
        let sparse = blocksparse_attention_impl(
            tensor(&q),
            tensor(&k),
            tensor(&v),
            heads,
            mode,
            ctx,
            32,
            num_verts,
            vertsize,
        )
        .unwrap();
        let sparse: Vec<f32> = sparse.into_data().try_to_vec().unwrap();
        let pattern = mode
            .pattern(ModeParams {
                local_attn_ctx: ctx,
                blocksize: 32,
                num_verts,
                vertsize,
            })
            .unwrap();
        let shape = RefShape {
            batch: 1,
            heads,
            seq_len: n,
            head_dim: d,
        };
        let (qh, kh, vh) = (
            split(&q, n, heads, d),
            split(&k, n, heads, d),
            split(&v, n, heads, d),
        );
        let reference = reference_forward(
            pattern.as_ref(),
            shape,
            &qh,
            &kh,
            &vh,
            1.0 / (d as f64).sqrt(),
        );
        let sparse_heads = split(
            &sparse.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            n,
            heads,
            d,
        );
        let sparse_heads: Vec<f32> = sparse_heads.iter().map(|&x| x as f32).collect();
        assert_close(
            &sparse_heads,
            &reference.out,
            1e-5,
            &format!("{mode:?} vs f64 reference"),
        );
        if mode != AttnMode::Fixed {
            let dense =
                attention_impl(tensor(&q), tensor(&k), tensor(&v), heads, mode, ctx).unwrap();
            let dense: Vec<f64> = dense
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
                .into_iter()
                .map(f64::from)
                .collect();
            assert_close(
                &sparse,
                &dense,
                1e-5,
                &format!("{mode:?} vs attention_impl"),
            );
        }
    }
}

//! Bad input gets a typed error naming what was expected; nothing panics.

use burn::tensor::{Device, Tensor};
use sparse_attn_core::pattern::{Band, Fixed, Strided};
use sparse_attn_core::{
    AttentionOptions, AttnMode, BlockLayout, SparseAttentionError as E, attention_impl,
    blocksparse_attention_impl, sparse_attention,
};

fn zeros4(dims: [usize; 4]) -> Tensor<4> {
    Tensor::zeros(dims, &Device::ndarray())
}

fn zeros3(dims: [usize; 3]) -> Tensor<3> {
    Tensor::zeros(dims, &Device::ndarray())
}

#[test]
fn block_size_out_of_range() {
    for b in [0, 129] {
        let err = BlockLayout::build(&Band::causal(), 64, b, 1).unwrap_err();
        assert_eq!(
            err,
            E::BlockSize {
                got: b,
                min: 1,
                max: 128
            }
        );
        assert!(err.to_string().contains("between 1 and 128"));
    }
    let x = zeros3([1, 64, 16]);
    let err = blocksparse_attention_impl(x.clone(), x.clone(), x, 2, AttnMode::All, None, 0, 1, 1)
        .unwrap_err();
    assert!(matches!(err, E::BlockSize { got: 0, .. }));
}

#[test]
fn pattern_parameters() {
    assert!(matches!(
        Band::local(0),
        Err(E::InvalidPattern {
            pattern: "local",
            ..
        })
    ));
    assert!(matches!(
        Band::sliding_window(0),
        Err(E::InvalidPattern { .. })
    ));
    assert!(matches!(
        Strided::new(0),
        Err(E::InvalidPattern {
            pattern: "strided",
            ..
        })
    ));
    // num_verts * vertsize beyond the window (in blocks): 4 * 2 > 128 / 32.
    let err = Fixed::sparse_transformer(128, 4, 2, 32).unwrap_err();
    assert!(
        err.to_string().contains("exceeds local_attn_ctx = 128"),
        "{err}"
    );
    // heads not a multiple of num_verts.
    let fixed = Fixed::sparse_transformer(128, 4, 1, 32).unwrap();
    let err = BlockLayout::build(&fixed, 256, 32, 6).unwrap_err();
    assert!(
        err.to_string().contains("not a multiple of num_verts = 4"),
        "{err}"
    );
    let x = zeros3([1, 64, 16]);
    let err =
        blocksparse_attention_impl(x.clone(), x.clone(), x, 2, AttnMode::Local, None, 8, 1, 1)
            .unwrap_err();
    assert!(
        err.to_string().contains("local_attn_ctx is required"),
        "{err}"
    );
    assert!(matches!(
        "banded".parse::<AttnMode>(),
        Err(E::UnknownMode(_))
    ));
}

#[test]
fn shapes_and_heads() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 2).unwrap();
    let q = zeros4([1, 2, 16, 4]);
    let err = sparse_attention(
        q.clone(),
        zeros4([1, 2, 16, 5]),
        q.clone(),
        &layout,
        AttentionOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        E::Shape {
            name: "k",
            got: vec![1, 2, 16, 5],
            expected: "[1, 2, 16, 4]: `q`'s shape [1, 2, 16, 4] with `k`'s 2 key/value heads"
                .into()
        }
    );
    let err = sparse_attention(
        zeros4([0, 2, 16, 4]),
        zeros4([0, 2, 16, 4]),
        zeros4([0, 2, 16, 4]),
        &layout,
        AttentionOptions::default(),
    )
    .unwrap_err();
    assert_eq!(err, E::Zero { name: "batch" });
    let x = zeros3([1, 16, 10]);
    let err = blocksparse_attention_impl(
        x.clone(),
        x.clone(),
        x.clone(),
        3,
        AttnMode::All,
        None,
        8,
        1,
        1,
    )
    .unwrap_err();
    assert_eq!(
        err,
        E::HeadsDivide {
            n_embd: 10,
            heads: 3
        }
    );
    let err = attention_impl(x.clone(), x.clone(), x, 3, AttnMode::All, None).unwrap_err();
    assert_eq!(
        err,
        E::HeadsDivide {
            n_embd: 10,
            heads: 3
        }
    );
    let err = sparse_attention(
        q.clone(),
        q.clone(),
        q,
        &layout,
        AttentionOptions::with_scale(f64::NAN),
    )
    .unwrap_err();
    assert!(matches!(err, E::Scale(_)));
}

#[test]
fn layout_for_another_problem() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 2).unwrap();
    let q = zeros4([1, 2, 24, 4]);
    let err = sparse_attention(
        q.clone(),
        q.clone(),
        q,
        &layout,
        AttentionOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        E::LayoutMismatch {
            what: "seq_len",
            layout: 16,
            input: 24
        }
    );
    let q = zeros4([1, 3, 16, 4]);
    let err = sparse_attention(
        q.clone(),
        q.clone(),
        q,
        &layout,
        AttentionOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        E::LayoutMismatch {
            what: "heads",
            layout: 2,
            input: 3
        }
    );
}

#[test]
fn device_mismatch() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 1).unwrap();
    let q = zeros4([1, 1, 16, 4]);
    let other = Device::ndarray().autodiff();
    let k = Tensor::<4>::zeros([1, 1, 16, 4], &other);
    let result = sparse_attention(q.clone(), k, q, &layout, AttentionOptions::default());
    // An autodiff view of the same device is the same device to Burn; a different backend is not.
    #[cfg(feature = "flex")]
    {
        let k = Tensor::<4>::zeros([1, 1, 16, 4], &Device::flex());
        let q = zeros4([1, 1, 16, 4]);
        let err =
            sparse_attention(q.clone(), k, q, &layout, AttentionOptions::default()).unwrap_err();
        assert!(matches!(err, E::DeviceMismatch { name: "k", .. }), "{err}");
    }
    drop(result);
}

/// A row with no allowed key gives zeros, never NaN, forward and backward, on every backend.
#[test]
fn empty_rows_are_zero() {
    let p = sparse_attn_core::pattern::FnPattern::new("none_for_even", false, |_, i, j| {
        i % 2 == 1 && j <= i
    });
    let layout = BlockLayout::build(&p, 8, 4, 1).unwrap();
    for (backend, device) in crate::common::devices() {
        let q = Tensor::<4>::ones([1, 1, 8, 2], &device).require_grad();
        let out = sparse_attention(
            q.clone(),
            q.clone(),
            q.clone(),
            &layout,
            AttentionOptions::default(),
        )
        .unwrap();
        let values: Vec<f32> = out.clone().into_data().try_to_vec().unwrap();
        assert!(values.iter().all(|x| x.is_finite()), "{backend}");
        assert_eq!(&values[0..2], &[0.0, 0.0], "{backend}");
        let g = out.sum().backward();
        let grad: Vec<f32> = q.grad(&g).unwrap().into_data().try_to_vec().unwrap();
        assert!(grad.iter().all(|x| x.is_finite()), "{backend}");
    }
}

/// A head dim beyond the CubeCL kernels' register rows is a typed error naming the limit on
/// a CubeCL device, and runs on the CPU backends and through the portable path.
#[cfg(feature = "wgpu")]
#[test]
fn head_dim_beyond_cubecl_kernels() {
    let layout = BlockLayout::build(&Band::causal(), 4, 4, 1).unwrap();
    for (backend, device) in crate::common::devices() {
        let q = Tensor::<4>::zeros([1, 1, 4, 257], &device);
        let (a, b, c) = (q.clone(), q.clone(), q.clone());
        let result = sparse_attention(a, b, c, &layout, AttentionOptions::default());
        if backend == "wgpu" || backend == "vulkan" {
            let err = result.unwrap_err();
            assert_eq!(
                err,
                E::DeviceLimit {
                    what: "head dim",
                    got: 257,
                    max: 256,
                    backend: "CubeCL"
                }
            );
            assert!(err.to_string().contains("at most 256"), "{err}");
            let portable = sparse_attn_core::sparse_attention_portable(
                q.clone(),
                q.clone(),
                q,
                &layout,
                AttentionOptions::default(),
            );
            assert!(portable.is_ok(), "{backend}: portable path");
        } else {
            assert!(result.is_ok(), "{backend}");
        }
    }
}

#[test]
fn dropout_outside_zero_one() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 2).unwrap();
    let q = zeros4([1, 2, 16, 4]);
    for p in [1.0, 1.5, -0.1, f64::NAN, f64::INFINITY] {
        let options = AttentionOptions::default().dropout(p, 0);
        let err = sparse_attention(q.clone(), q.clone(), q.clone(), &layout, options).unwrap_err();
        assert!(
            matches!(
                err,
                E::Probability {
                    name: "dropout",
                    ..
                }
            ),
            "p = {p}: {err}"
        );
        assert!(err.to_string().contains("[0, 1)"));
    }
}

#[test]
fn key_lengths_of_the_wrong_count_or_too_long() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 2).unwrap();
    let q = zeros4([2, 2, 16, 4]);
    let attend = |lengths: Vec<usize>| {
        let options = AttentionOptions::default().key_lengths(lengths);
        sparse_attention(q.clone(), q.clone(), q.clone(), &layout, options).unwrap_err()
    };
    assert_eq!(attend(vec![16]), E::KeyLengths { got: 1, batch: 2 });
    assert_eq!(
        attend(vec![16, 17]),
        E::KeyLength {
            row: 1,
            len: 17,
            seq_len: 16
        }
    );
    assert!(attend(vec![3, 20]).to_string().contains("at most 16"));
}

#[test]
fn kv_heads_not_dividing_heads() {
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 4).unwrap();
    let q = zeros4([1, 4, 16, 4]);
    let kv = zeros4([1, 3, 16, 4]);
    let err = sparse_attention(
        q.clone(),
        kv.clone(),
        kv,
        &layout,
        AttentionOptions::default(),
    )
    .unwrap_err();
    assert_eq!(
        err,
        E::KvHeads {
            heads: 4,
            kv_heads: 3
        }
    );
    // K and V must agree with each other too.
    let (k, v) = (zeros4([1, 2, 16, 4]), zeros4([1, 1, 16, 4]));
    let err = sparse_attention(q, k, v, &layout, AttentionOptions::default()).unwrap_err();
    assert!(matches!(err, E::Shape { name: "v", .. }), "{err}");
}

/// q, k and v of different dtypes are a typed error naming the odd one, on every backend
/// (on a CubeCL device the kernels would otherwise read k/v in q's element type).
#[test]
fn dtypes_that_differ() {
    use burn::tensor::DType;
    let layout = BlockLayout::build(&Band::causal(), 16, 8, 1).unwrap();
    for (backend, device) in crate::common::devices() {
        let q = Tensor::<4>::zeros([1, 1, 16, 4], &device);
        let other = if backend == "ndarray" || backend == "flex" {
            DType::F64
        } else {
            DType::F16
        };
        let odd = q.clone().cast(other);
        for (name, k, v) in [("k", odd.clone(), q.clone()), ("v", q.clone(), odd.clone())] {
            let err = sparse_attention(q.clone(), k, v, &layout, AttentionOptions::default())
                .unwrap_err();
            assert!(
                matches!(&err, E::DTypeMismatch { name: n, .. } if *n == name),
                "{backend}: {err}"
            );
            assert!(err.to_string().contains("cast it first"), "{err}");
        }
    }
}

/// Heads, blocks and tokens outside a layout: empty rows and columns, `false`, or a typed
/// error; never an index panic.
#[test]
fn layout_queries_outside_the_layout() {
    for layout in [
        BlockLayout::build(&Band::causal(), 64, 16, 2).unwrap(),
        BlockLayout::build(&Fixed::sparse_transformer(32, 1, 1, 16).unwrap(), 64, 16, 2).unwrap(),
        BlockLayout::build(&Strided::new(8).unwrap(), 64, 16, 2).unwrap(),
    ] {
        assert_eq!(layout.row(5, 99).count(), 0);
        assert_eq!(layout.row(0, 99).count(), 0);
        assert_eq!(layout.row(2, 0).count(), 0);
        assert_eq!(layout.column(0, 4).count(), 0);
        assert_eq!(layout.column(7, 0).count(), 0);
        assert!(!layout.allows(0, 1000, 2000));
        assert!(!layout.allows(0, 64, 0));
        assert!(!layout.allows(0, 0, 64));
        assert!(!layout.allows(2, 0, 0));
        assert!(!layout.allows_position(0, 63, 64));
        let out_of_range = E::OutOfRange {
            what: "head",
            got: 2,
            len: 2,
        };
        assert_eq!(layout.stats(2).unwrap_err(), out_of_range);
        assert_eq!(layout.picture(2, 16).unwrap_err(), out_of_range);
        assert_eq!(layout.active_blocks(2).unwrap_err(), out_of_range);
        assert!(layout.stats(1).is_ok() && layout.picture(1, 16).is_ok());
    }
    // A short last block: its positions past the sequence are outside the layout even
    // where the block is full.
    let short = BlockLayout::build(&Band::causal(), 17, 16, 1).unwrap();
    assert!(short.allows_position(0, 16, 0));
    assert!(!short.allows_position(0, 20, 0));
}

/// Pattern parameters whose arithmetic would overflow are refused at construction or
/// saturate to "every token", never wrap.
#[test]
fn pattern_parameters_that_overflow() {
    use sparse_attn_core::pattern::{Dilated, Pattern};
    for (window, dilation) in [(usize::MAX, 2), (3, usize::MAX), (1 << 40, 1 << 40)] {
        let err = Dilated::new(window, dilation, true).unwrap_err();
        assert!(err.to_string().contains("overflows"), "{err}");
    }
    assert!(Dilated::new(1, usize::MAX, true).is_err());
    let wide = Band::local(usize::MAX).unwrap();
    assert!(wide.allows(0, 1 << 40, 0) && !wide.allows(0, 0, 1));
    let both = Band::bidirectional_window(usize::MAX);
    assert!(both.allows(0, 0, 1 << 40) && both.allows(0, 1 << 40, 0));
}

/// Zero-sized inputs of the original API are a typed error naming the dimension (n_ctx = 0
/// panicked in Burn's reshape; found by the fuzz test).
#[test]
fn original_api_zero_sized_inputs() {
    for (dims, name) in [
        ([0, 8, 4], "batch"),
        ([1, 0, 4], "n_ctx"),
        ([1, 8, 0], "n_embd"),
    ] {
        let x = zeros3(dims);
        let err =
            attention_impl(x.clone(), x.clone(), x.clone(), 1, AttnMode::All, None).unwrap_err();
        assert_eq!(err, E::Zero { name });
        let err =
            blocksparse_attention_impl(x.clone(), x.clone(), x, 1, AttnMode::All, None, 4, 1, 1)
                .unwrap_err();
        assert_eq!(err, E::Zero { name });
    }
}

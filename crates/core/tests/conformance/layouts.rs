//! Property tests: every layout builder against a brute-force scan of its predicate, and
//! the structural invariants (sorted rows, exact transpose, cheap clones).

use std::sync::Arc;

use proptest::prelude::*;
use sparse_attn_core::pattern::{
    Band, BigBird, BigBirdConfig, BlockMatrix, Dilated, Fixed, Intersection, Longformer, PerHead,
    Streaming, Strided, Union, VariableWindows,
};
use sparse_attn_core::{BlockLayout, Pattern};

/// The layout covers the pattern exactly; rows are sorted; columns are the transpose.
fn check_exact(pattern: &dyn Pattern, n: usize, block: usize, heads: usize) {
    let layout = BlockLayout::build(pattern, n, block, heads).unwrap();
    for h in 0..heads {
        for i in 0..n {
            for j in 0..n {
                assert_eq!(
                    layout.allows(h, i, j),
                    pattern.allows(h, i, j),
                    "{} n={n} b={block} head {h}: pair ({i}, {j})",
                    pattern.name()
                );
            }
        }
        let nb = layout.n_blocks();
        let mut from_rows = vec![];
        for r in 0..nb {
            let cols: Vec<usize> = layout.row(h, r).map(|(c, _)| c).collect();
            assert!(
                cols.windows(2).all(|w| w[0] < w[1]),
                "row {r} not strictly increasing"
            );
            from_rows.extend(cols.into_iter().map(|c| (c, r)));
        }
        let mut from_cols = vec![];
        for c in 0..nb {
            let rows: Vec<usize> = layout.column(h, c).collect();
            assert!(
                rows.windows(2).all(|w| w[0] < w[1]),
                "column {c} not strictly increasing"
            );
            from_cols.extend(rows.into_iter().map(|r| (c, r)));
        }
        from_rows.sort_unstable();
        assert_eq!(
            from_rows, from_cols,
            "transposed lists are not the transpose"
        );
    }
}

fn arc(p: impl Pattern + 'static) -> Arc<dyn Pattern> {
    Arc::new(p)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn bands(n in 1usize..70, block in 1usize..20, w in 1usize..30, kind in 0usize..5) {
        let p = match kind {
            0 => Band::causal(),
            1 => Band::dense(),
            2 => Band::local(w).unwrap(),
            3 => Band::bidirectional_window(w),
            _ => Band::local_bidirectional(w).unwrap(),
        };
        check_exact(&p, n, block, 1);
    }

    #[test]
    fn strided(n in 1usize..70, block in 1usize..20, stride in 1usize..20, causal: bool) {
        let p = if causal { Strided::new(stride).unwrap() } else { Strided::bidirectional(stride).unwrap() };
        check_exact(&p, n, block, 1);
    }

    #[test]
    fn fixed(n in 1usize..80, block in 1usize..20, l in 1usize..24, verts in 1usize..4, c in 1usize..6, causal: bool) {
        prop_assume!(verts * c <= l);
        let p = if causal { Fixed::new(l, verts, c).unwrap() } else { Fixed::bidirectional(l, verts, c).unwrap() };
        check_exact(&p, n, block, verts * 2);
    }

    #[test]
    fn windows_with_extras(
        n in 1usize..70, block in 1usize..20, w in 1usize..12, g in 0usize..70, seed: u64, causal: bool,
        rb in 1usize..12, r in 0usize..4,
    ) {
        let globals = if g < n { vec![g] } else { vec![] };
        check_exact(&Longformer::new(w, globals.clone(), causal).unwrap(), n, block, 1);
        let cfg = BigBirdConfig { window: w, global_tokens: globals, random_blocks: r, random_block: rb, seed, causal };
        check_exact(&BigBird::new(cfg, n).unwrap(), n, block, 1);
        check_exact(&Streaming::new(g % 9, w).unwrap(), n, block, 1);
        check_exact(&Dilated::new(w, 1 + g % 4, causal).unwrap(), n, block, 1);
        check_exact(&VariableWindows::new(vec![w, 1 + g % 7, 3], causal).unwrap(), n, block, 1);
    }

    #[test]
    fn combinations(n in 1usize..60, block in 1usize..16, w in 1usize..12, s in 1usize..10) {
        let parts = vec![arc(Band::local(w).unwrap()), arc(Strided::new(s).unwrap())];
        check_exact(&Union::new(parts.clone()).unwrap(), n, block, 1);
        check_exact(&Intersection::new(vec![arc(Band::causal()), arc(Band::bidirectional_window(w))]).unwrap(), n, block, 1);
        check_exact(&Intersection::new(parts.clone()).unwrap(), n, block, 1);
        check_exact(&PerHead::new(parts).unwrap(), n, block, 2);
    }

    #[test]
    fn block_matrix(cells in proptest::collection::vec(any::<bool>(), 36), mb in 1usize..6, block in 1usize..12) {
        let rows: Vec<Vec<bool>> = cells.chunks(6).map(<[bool]>::to_vec).collect();
        let p = BlockMatrix::new(mb, &rows).unwrap();
        check_exact(&p, 6 * mb - (mb - 1) / 2, block, 1);
    }
}

/// The block counts of the original modes at n = 1024, b = 32 (issue #2's table).
#[test]
fn sparse_transformer_block_counts() {
    let count = |p: &dyn Pattern, heads| BlockLayout::build(p, 1024, 32, heads).unwrap();
    assert_eq!(count(&Band::causal(), 4).active_blocks(0).unwrap(), 528);
    assert_eq!(
        count(&Band::local(32).unwrap(), 4)
            .active_blocks(0)
            .unwrap(),
        63
    );
    assert_eq!(
        count(&Strided::new(32).unwrap(), 4)
            .active_blocks(0)
            .unwrap(),
        32
    );
    let fixed = count(&Fixed::sparse_transformer(128, 4, 1, 32).unwrap(), 4);
    assert_eq!(
        (0..4)
            .map(|h| fixed.active_blocks(h).unwrap())
            .collect::<Vec<_>>(),
        vec![192; 4]
    );
}

/// A one-million-token window layout builds in O(active blocks): the time budget lives in
/// the benchmark; here only its size is checked (so the test cannot be flaky).
#[test]
fn million_token_window_layout() {
    let layout = BlockLayout::build(&Band::sliding_window(1024).unwrap(), 1 << 20, 64, 1).unwrap();
    assert_eq!(layout.n_blocks(), 16384);
    // 17 blocks per row (16 behind plus the diagonal), fewer in the first 16 rows.
    assert_eq!(
        layout.total_active_blocks(),
        17 * 16384 - (1..=16).sum::<usize>()
    );
    // Partial: the diagonal block of every row, and the window's far edge from row 16 on.
    let stats = layout.stats(0).unwrap();
    assert_eq!(stats.partial_blocks, 2 * 16384 - 16);
}

#[test]
fn clones_share_and_picture_draws() {
    let layout = BlockLayout::build(&Band::local(8).unwrap(), 40, 8, 1).unwrap();
    let copy = layout.clone();
    assert!(copy.ptr_eq(&layout));
    let picture = layout.picture(0, 80).unwrap();
    let grid: Vec<&str> = picture.lines().skip(1).collect();
    assert_eq!(grid, vec!["+....", "++...", ".++..", "..++.", "...++"]);
}

/// Every pattern that answers `stream_window` keeps its promise (causal; past the sinks a
/// function of `i - j` that ends at the reach; sinks read the same from `sinks + reach - 1`
/// on), and the patterns that read the whole past, or in another token order, answer `None`.
#[test]
fn stream_windows_keep_their_promise() {
    use sparse_attn_core::StreamWindow;
    let windows: Vec<(Arc<dyn Pattern>, StreamWindow, usize)> = vec![
        (
            arc(Band::local(5).unwrap()),
            StreamWindow { sinks: 0, reach: 5 },
            1,
        ),
        (
            arc(Band::sliding_window(1).unwrap()),
            StreamWindow { sinks: 0, reach: 1 },
            1,
        ),
        (
            arc(Dilated::new(4, 3, true).unwrap()),
            StreamWindow {
                sinks: 0,
                reach: 10,
            },
            1,
        ),
        (
            arc(Streaming::new(3, 6).unwrap()),
            StreamWindow { sinks: 3, reach: 6 },
            1,
        ),
        (
            arc(Union::new(vec![
                arc(Band::local(9).unwrap()),
                arc(Streaming::new(2, 4).unwrap()),
            ])
            .unwrap()),
            StreamWindow { sinks: 2, reach: 9 },
            1,
        ),
        (
            arc(Intersection::new(vec![
                arc(Band::local(7).unwrap()),
                arc(Dilated::new(3, 2, true).unwrap()),
            ])
            .unwrap()),
            StreamWindow { sinks: 0, reach: 7 },
            1,
        ),
        (
            arc(PerHead::new(vec![
                arc(Streaming::new(4, 3).unwrap()),
                arc(Band::local(8).unwrap()),
            ])
            .unwrap()),
            StreamWindow { sinks: 4, reach: 8 },
            2,
        ),
    ];
    let n = 48;
    for (pattern, want, heads) in &windows {
        let w = pattern.stream_window();
        assert_eq!(w, Some(*want), "{}", pattern.name());
        let StreamWindow { sinks, reach } = *want;
        for h in 0..*heads {
            for i in 0..n {
                for j in 0..n {
                    let got = pattern.allows(h, i, j);
                    let what = format!("{} head {h} pair ({i}, {j})", pattern.name());
                    if j > i {
                        assert!(!got, "{what}: reads the future");
                    } else if j >= sinks {
                        assert_eq!(
                            got,
                            pattern.allows(h, i - j + sinks, sinks),
                            "{what}: not a function of i - j"
                        );
                        assert!(!got || i - j < reach, "{what}: beyond the reach {reach}");
                    } else if i >= sinks + reach - 1 {
                        assert_eq!(
                            got,
                            pattern.allows(h, sinks + reach - 1, j),
                            "{what}: sink changes"
                        );
                    }
                }
            }
        }
    }
    let whole_past: Vec<Arc<dyn Pattern>> = vec![
        arc(Band::causal()),
        arc(Band::bidirectional_window(4)),
        arc(Dilated::new(4, 2, false).unwrap()),
        arc(Strided::new(4).unwrap()),
        arc(Fixed::new(8, 1, 2).unwrap()),
        arc(Longformer::new(4, vec![0], true).unwrap()),
        arc(Union::new(vec![
            arc(Band::local(4).unwrap()),
            arc(Strided::new(4).unwrap()),
        ])
        .unwrap()),
    ];
    for pattern in whole_past {
        assert_eq!(pattern.stream_window(), None, "{}", pattern.name());
    }
}

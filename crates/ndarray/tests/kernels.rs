//! The fused kernels against a simple dense f64 implementation over awkward sizes
//! (n = 1, b - 1, b, b + 1, non-multiples; d = 1, 3; shared and per-head layouts), with
//! random block sets and random partial masks from a seeded generator, each layout also
//! over a random token order (the kernels' permuted path).

use sparse_attn_ndarray::{
    AttentionShape, CsrLayout, DropoutMask, FULL_BLOCK, KernelOptions, TILE_CACHE_BYTES,
    backward_with_tile_cache, forward,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn unit(&mut self) -> f64 {
        self.next() as f64 / (1u64 << 31) as f64 * 2.0 - 1.0
    }
}

/// An owned CSR layout with its dense truth table `[layout_heads, n, n]`.
struct Owned {
    n: usize,
    block: usize,
    heads: usize,
    row_ptr: Vec<u32>,
    cols: Vec<u32>,
    masks: Vec<u32>,
    col_ptr: Vec<u32>,
    t_rows: Vec<u32>,
    t_entries: Vec<u32>,
    bits: Vec<u64>,
    words: usize,
    /// Token at each layout position, for a permuted layout.
    order: Option<Vec<usize>>,
    /// Truth table in token space.
    allowed: Vec<bool>,
}

impl Owned {
    fn random(rng: &mut Rng, n: usize, block: usize, heads: usize) -> Self {
        let nb = n.div_ceil(block);
        let words = (block * block).div_ceil(64);
        let mut o = Owned {
            n,
            block,
            heads,
            row_ptr: vec![0],
            cols: vec![],
            masks: vec![],
            col_ptr: vec![],
            t_rows: vec![],
            t_entries: vec![],
            bits: vec![],
            words,
            order: None,
            allowed: vec![false; heads * n * n],
        };
        for h in 0..heads {
            for r in 0..nb {
                for c in 0..nb {
                    match rng.next() % 3 {
                        0 => continue,
                        1 => o.masks.push(FULL_BLOCK),
                        _ => {
                            o.masks.push((o.bits.len() / words) as u32);
                            o.bits
                                .extend((0..words).map(|_| rng.next() << 32 | rng.next()));
                        }
                    }
                    o.cols.push(c as u32);
                    let m = *o.masks.last().unwrap();
                    for i in r * block..((r + 1) * block).min(n) {
                        for j in c * block..((c + 1) * block).min(n) {
                            let bit = (i - r * block) * block + (j - c * block);
                            let on = m == FULL_BLOCK
                                || o.bits[m as usize * words + bit / 64] >> (bit % 64) & 1 == 1;
                            o.allowed[(h * n + i) * n + j] = on;
                        }
                    }
                }
                o.row_ptr.push(o.cols.len() as u32);
            }
        }
        // Transpose by scanning rows in order (rows ascend within each column).
        o.col_ptr = vec![0];
        for h in 0..heads {
            for c in 0..nb {
                for r in 0..nb {
                    let row = h * nb + r;
                    for e in o.row_ptr[row]..o.row_ptr[row + 1] {
                        if o.cols[e as usize] == c as u32 {
                            o.t_rows.push(r as u32);
                            o.t_entries.push(e);
                        }
                    }
                }
                o.col_ptr.push(o.t_rows.len() as u32);
            }
        }
        o
    }

    /// The same blocks over a random token order: position `p` holds token `order[p]`, so
    /// the truth table moves to `allowed[order[i]][order[j]]`.
    fn permuted(&self, rng: &mut Rng) -> Self {
        let n = self.n;
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, rng.next() as usize % (i + 1));
        }
        let mut allowed = vec![false; self.allowed.len()];
        for h in 0..self.heads {
            for i in 0..n {
                for j in 0..n {
                    allowed[(h * n + order[i]) * n + order[j]] = self.allowed[(h * n + i) * n + j];
                }
            }
        }
        Self {
            row_ptr: self.row_ptr.clone(),
            cols: self.cols.clone(),
            masks: self.masks.clone(),
            col_ptr: self.col_ptr.clone(),
            t_rows: self.t_rows.clone(),
            t_entries: self.t_entries.clone(),
            bits: self.bits.clone(),
            order: Some(order),
            allowed,
            ..*self
        }
    }

    fn view(&self) -> CsrLayout<'_> {
        CsrLayout {
            seq_len: self.n,
            block: self.block,
            n_blocks: self.n.div_ceil(self.block),
            layout_heads: self.heads,
            row_ptr: &self.row_ptr,
            cols: &self.cols,
            masks: &self.masks,
            col_ptr: &self.col_ptr,
            t_rows: &self.t_rows,
            t_entries: &self.t_entries,
            mask_bits: &self.bits,
            mask_words: self.words,
            order: self.order.as_deref(),
        }
    }
}

/// Dense f64 forward and gradients of `sum(out * dout)`, with grouped key/value heads, key
/// lengths and dropout written out directly from their definitions.
#[allow(clippy::type_complexity, clippy::too_many_arguments)]
fn simple(
    o: &Owned,
    shape: AttentionShape,
    extras: &KernelOptions<'_>,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    dout: &[f64],
    scale: f64,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq_len: n,
        head_dim: d,
    } = shape;
    let (len, kv_len) = (shape.numel(), shape.kv_numel());
    let (mut out, mut dq, mut dk, mut dv) = (
        vec![0.0; len],
        vec![0.0; len],
        vec![0.0; kv_len],
        vec![0.0; kv_len],
    );
    for bh in 0..batch * heads {
        let (bb, h) = (bh / heads, bh % heads);
        let lh = if o.heads == 1 { 0 } else { h };
        let bkv = bb * kv_heads + h / (heads / kv_heads);
        let valid = extras.key_lengths.map_or(n, |l| l[bb]);
        let keep = |i: usize, j: usize| {
            extras.dropout.map_or(1.0, |m| {
                if m.keeps_pair(bb, h, i, j) {
                    m.scale()
                } else {
                    0.0
                }
            })
        };
        let at = |x: &[f64], i: usize, t: usize| x[(bh * n + i) * d + t];
        let kv = |x: &[f64], j: usize, t: usize| x[(bkv * n + j) * d + t];
        for i in 0..n {
            let s: Vec<Option<f64>> = (0..n)
                .map(|j| {
                    (o.allowed[(lh * n + i) * n + j] && i < valid && j < valid)
                        .then(|| scale * (0..d).map(|t| at(q, i, t) * kv(k, j, t)).sum::<f64>())
                })
                .collect();
            let max = s
                .iter()
                .flatten()
                .copied()
                .fold(f64::NEG_INFINITY, f64::max);
            if max == f64::NEG_INFINITY {
                continue;
            }
            let e: Vec<f64> = s
                .iter()
                .map(|x| x.map_or(0.0, |x| (x - max).exp()))
                .collect();
            let z: f64 = e.iter().sum();
            let p: Vec<f64> = e.iter().map(|x| x / z).collect();
            for t in 0..d {
                out[(bh * n + i) * d + t] = (0..n).map(|j| p[j] * keep(i, j) * kv(v, j, t)).sum();
            }
            let dp: Vec<f64> = (0..n)
                .map(|j| keep(i, j) * (0..d).map(|t| at(dout, i, t) * kv(v, j, t)).sum::<f64>())
                .collect();
            let delta: f64 = (0..n).map(|j| p[j] * dp[j]).sum();
            for j in 0..n {
                let ds = p[j] * (dp[j] - delta) * scale;
                for t in 0..d {
                    dq[(bh * n + i) * d + t] += ds * kv(k, j, t);
                    dk[(bkv * n + j) * d + t] += ds * at(q, i, t);
                    dv[(bkv * n + j) * d + t] += p[j] * keep(i, j) * at(dout, i, t);
                }
            }
        }
    }
    (out, dq, dk, dv)
}

fn close(got: &[f32], want: &[f64], what: &str) {
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (f64::from(g) - w).abs() <= 2e-5 * (1.0 + w.abs()),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

#[test]
fn fused_kernels_match_simple_dense_over_awkward_sizes() {
    let mut rng = Rng(42);
    for (n, block) in [
        (1, 1),
        (1, 8),
        (7, 8),
        (8, 8),
        (9, 8),
        (33, 8),
        (20, 3),
        (17, 16),
    ] {
        for (heads, kv_heads, layout_heads) in
            [(1, 1, 1), (3, 3, 1), (2, 2, 2), (4, 2, 4), (3, 1, 1)]
        {
            for d in [1, 3, 16] {
                let o = Owned::random(&mut rng, n, block, layout_heads);
                let permuted = o.permuted(&mut rng);
                let shape = AttentionShape {
                    batch: 2,
                    heads,
                    kv_heads,
                    seq_len: n,
                    head_dim: d,
                };
                let mut random = |len| (0..len).map(|_| rng.unit()).collect::<Vec<f64>>();
                let (q, k, v, g) = (
                    random(shape.numel()),
                    random(shape.kv_numel()),
                    random(shape.kv_numel()),
                    random(shape.numel()),
                );
                // Plain; a short second batch row; dropout; both.
                let lengths = [n, n / 2];
                let mask = DropoutMask::new(0.3, (n * 31 + d) as u64);
                for (with_lengths, with_dropout) in
                    [(false, false), (true, false), (false, true), (true, true)]
                {
                    let extras = KernelOptions {
                        key_lengths: with_lengths.then_some(&lengths[..]),
                        dropout: if with_dropout { mask } else { None },
                        ..KernelOptions::default()
                    };
                    let what = format!(
                        "n={n} b={block} h={heads}/{kv_heads}/{layout_heads} d={d} lengths={with_lengths} dropout={with_dropout}"
                    );
                    check_case(&o, shape, &extras, [&q, &k, &v, &g], &what);
                    let what = format!("{what} permuted");
                    check_case(&permuted, shape, &extras, [&q, &k, &v, &g], &what);
                }
            }
        }
    }
}

/// The fused kernels against [`simple`] on one case: forward, both backward strategies,
/// and a second forward bit for bit.
fn check_case(
    o: &Owned,
    shape: AttentionShape,
    extras: &KernelOptions<'_>,
    [q, k, v, g]: [&[f64]; 4],
    what: &str,
) {
    let f = |x: &[f64]| x.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    let scale = 0.7;
    let (want_out, want_dq, want_dk, want_dv) = simple(o, shape, extras, q, k, v, g, scale);
    let run_forward = || {
        let (mut out, mut lse) = (vec![0.0f32; shape.numel()], vec![0.0f32; shape.rows()]);
        forward(
            &f(q),
            &f(k),
            &f(v),
            shape,
            &o.view(),
            scale as f32,
            extras,
            &mut out,
            &mut lse,
        );
        (out, lse)
    };
    let (out, lse) = run_forward();
    close(&out, &want_out, &format!("{what} out"));
    // Both backward strategies: stored dK/dV contributions (all columns in one chunk, and
    // chunks of the widest column's size), and recompute (budget 0).
    let widest = o.col_ptr.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as usize;
    let slot = 2 * o.block * shape.head_dim * std::mem::size_of::<f32>();
    let one_column = widest * slot;
    for budget in [TILE_CACHE_BYTES, one_column, 0] {
        // Garbage in the gradients: the kernel must overwrite, not add to, what is there.
        let mut dq = vec![9.0f32; shape.numel()];
        let (mut dk, mut dv) = (
            vec![9.0f32; shape.kv_numel()],
            vec![9.0f32; shape.kv_numel()],
        );
        backward_with_tile_cache(
            &f(q),
            &f(k),
            &f(v),
            &out,
            &lse,
            &f(g),
            shape,
            &o.view(),
            scale as f32,
            extras,
            &mut dq,
            &mut dk,
            &mut dv,
            budget,
        );
        let what = format!("{what} cache={budget}");
        close(&dq, &want_dq, &format!("{what} dq"));
        close(&dk, &want_dk, &format!("{what} dk"));
        close(&dv, &want_dv, &format!("{what} dv"));
    }
    let (out2, _) = run_forward();
    assert!(
        out.iter()
            .zip(&out2)
            .all(|(a, b)| a.to_bits() == b.to_bits()),
        "{what}: not deterministic"
    );
}

/// The relative-position bias gradient is the same through every backward strategy (stored
/// contributions in one chunk or per column, recompute), with and without a token order,
/// and the same bits from run to run.
#[test]
fn bias_gradient_agrees_over_backward_strategies() {
    use sparse_attn_ndarray::{
        RelativeBias, RelativeBuckets, ScoreMods, backward_with_deltas, row_deltas,
    };
    let mut rng = Rng(7);
    let (n, block, d) = (45, 8, 4);
    let shape = AttentionShape {
        batch: 2,
        heads: 4,
        kv_heads: 2,
        seq_len: n,
        head_dim: d,
    };
    let buckets = RelativeBuckets::new(8, 16, true).unwrap();
    let table: Vec<f64> = (0..4 * 8).map(|_| rng.unit()).collect();
    let extras = KernelOptions {
        mods: ScoreMods {
            bias: Some(RelativeBias {
                buckets: &buckets,
                table: &table,
            }),
            ..ScoreMods::default()
        },
        ..KernelOptions::default()
    };
    let o = Owned::random(&mut rng, n, block, 1);
    let permuted = o.permuted(&mut rng);
    let mut random = |len| (0..len).map(|_| rng.unit() as f32).collect::<Vec<f32>>();
    let (q, k, v, g) = (
        random(shape.numel()),
        random(shape.kv_numel()),
        random(shape.kv_numel()),
        random(shape.numel()),
    );
    for layout in [&o, &permuted] {
        let (mut out, mut lse) = (vec![0.0f32; shape.numel()], vec![0.0f32; shape.rows()]);
        forward(
            &q,
            &k,
            &v,
            shape,
            &layout.view(),
            0.5,
            &extras,
            &mut out,
            &mut lse,
        );
        let delta = row_deltas(&out, &g, d);
        let widest = layout
            .col_ptr
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0) as usize;
        let one_column = widest * 2 * block * d * std::mem::size_of::<f32>();
        let dbias = |budget: usize| {
            let mut grads =
                [shape.numel(), shape.kv_numel(), shape.kv_numel()].map(|len| vec![0.0f32; len]);
            let mut dbias = vec![f32::NAN; table.len()];
            let [dq, dk, dv] = &mut grads;
            let view = layout.view();
            let all = (&mut dq[..], &mut dk[..], &mut dv[..], Some(&mut dbias[..]));
            backward_with_deltas(
                &q, &k, &v, &delta, &lse, &g, shape, &view, 0.5, &extras, all, budget,
            );
            dbias
        };
        let stored = dbias(TILE_CACHE_BYTES);
        assert!(stored.iter().all(|x| x.is_finite()) && stored.iter().any(|&x| x != 0.0));
        assert_eq!(stored, dbias(TILE_CACHE_BYTES), "not deterministic");
        for budget in [one_column, 0] {
            let other = dbias(budget);
            for (i, (a, b)) in stored.iter().zip(&other).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                    "budget {budget} [{i}]: {a} vs {b}"
                );
            }
        }
    }
}

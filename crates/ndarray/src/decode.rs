//! The fused decode kernel: a few new query rows against the cached keys their layout rows
//! allow, split across key blocks so that one query row keeps every core busy.
//!
//! A decode call sees the layout built once for the cache's capacity. Query `i` of batch
//! row `b` is token `first[b] + i`; it attends the keys its layout row allows among the
//! cached tokens `0 .. first[b] + valid[b]` (the tokens written so far, its own included).
//! That is row `first[b] + i` of the full forward over the capacity with key length
//! `first[b] + valid[b]`, so for a causal pattern it is exactly what the full forward over
//! the text so far gives at that position.
//!
//! Each query row's active blocks are cut into chunks of [`CHUNK_KEYS`] keys; every
//! `(row, chunk)` pair is a task that keeps its own running maximum, sum and accumulator,
//! and a final pass merges a row's partials through their log-sum-exp. The chunks are fixed
//! by the layout, not by the thread count, so results are the same bits on any machine.

use rayon::prelude::*;

use crate::real::Real;
use sparse_attn_kernel_types::{AttentionShape, CsrLayout, RelativeBias, ScoreMods};

/// Keys per task of one query row (rounded down to whole blocks, at least one block).
pub const CHUNK_KEYS: usize = 1024;

/// Shape of a decode call: `q` and the output are `[batch, heads, queries, head_dim]`, the
/// caches `k` and `v` `[batch, kv_heads, capacity, head_dim]` with `capacity =
/// cache.seq_len`, the layout's sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeShape {
    /// The caches' shape (`seq_len` is the capacity).
    pub cache: AttentionShape,
    /// New query rows per batch row.
    pub queries: usize,
}

impl DecodeShape {
    /// Elements of `q` and of the output.
    pub fn q_numel(&self) -> usize {
        self.cache.batch * self.cache.heads * self.queries * self.cache.head_dim
    }
}

/// Which tokens the new rows are: batch row `b`'s queries `0 .. valid[b]` are tokens
/// `first[b] ..`, the rest of its `queries` rows are padding (zero output).
///
/// # Invariants
/// One entry per batch row; `valid[b] <= queries` and `first[b] + valid[b] <= capacity`
/// (the caller validates them).
#[derive(Debug, Clone, Copy)]
pub struct DecodeRows<'a> {
    /// First new token of each batch row.
    pub first: &'a [usize],
    /// Valid new rows of each batch row.
    pub valid: &'a [usize],
}

/// One task's share of a row: running max, sum and (unnormalised) output.
struct Partial<T> {
    max: T,
    sum: T,
    acc: Vec<T>,
}

/// Decode attention: `out[b, h, i] = sum_j softmax_j(mods(scale * q_i . k_j)) v_j` over the keys
/// `j` that `layout` allows for token `first[b] + i` among tokens `0 .. first[b] +
/// valid[b]` of the cache (see the module docs). `positions`, for a layout with a token
/// order, maps each token to its layout position (the order's inverse). A row with no
/// allowed key, and a padding row, gets zeros.
///
/// # Panics
/// If a slice length disagrees with `shape`, the layout's sequence length is not the
/// capacity, or `rows` breaks its invariants (the caller validates all of them).
#[allow(clippy::too_many_arguments)]
pub fn decode<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    shape: DecodeShape,
    layout: &CsrLayout<'_>,
    positions: Option<&[usize]>,
    rows: DecodeRows<'_>,
    scale: T,
    mods: ScoreMods<'_>,
    out: &mut [T],
) {
    let cache = shape.cache;
    let (m, d, cap) = (shape.queries, cache.head_dim, cache.seq_len);
    for (name, len, want) in [
        ("q", q.len(), shape.q_numel()),
        ("k", k.len(), cache.kv_numel()),
        ("v", v.len(), cache.kv_numel()),
        ("out", out.len(), shape.q_numel()),
    ] {
        assert_eq!(
            len, want,
            "decode: `{name}` has {len} elements, expected {want}"
        );
    }
    assert_eq!(layout.seq_len, cap, "decode: the layout is not the cache's");
    assert!(
        rows.first.len() == cache.batch && rows.valid.len() == cache.batch,
        "decode: rows are not one per batch row"
    );
    for (&first, &valid) in rows.first.iter().zip(rows.valid) {
        assert!(
            valid <= m && first + valid <= cap,
            "decode: rows past the cache"
        );
    }
    if let Some(p) = positions {
        assert_eq!(p.len(), cap, "decode: positions are not one per token");
    }
    out.fill(T::ZERO);
    if d == 0 || m == 0 {
        return;
    }
    let per_chunk = (CHUNK_KEYS / layout.block).max(1);
    // Every (row, chunk) task: (row index into `out` rows, entries of the layout row).
    let mut tasks = Vec::new();
    let mut row_tasks = vec![0usize..0; cache.batch * cache.heads * m];
    for b in 0..cache.batch {
        for h in 0..cache.heads {
            for i in 0..rows.valid[b] {
                let tok = rows.first[b] + i;
                let pos = positions.map_or(tok, |p| p[tok]);
                let entries = layout.row_entries(h, pos / layout.block);
                let row = (b * cache.heads + h) * m + i;
                let start = tasks.len();
                let mut e = entries.start;
                while e < entries.end {
                    let end = (e + per_chunk).min(entries.end);
                    tasks.push((row, e..end));
                    e = end;
                }
                row_tasks[row] = start..tasks.len();
            }
        }
    }
    let partials: Vec<Partial<T>> = tasks
        .par_iter()
        .map_init(Vec::new, |scores, (row, entries)| {
            let (bh, i) = (row / m, row % m);
            let b = bh / cache.heads;
            let tok = rows.first[b] + i;
            let key = KeyRange {
                local: positions.map_or(tok, |p| p[tok]) % layout.block,
                len: rows.first[b] + rows.valid[b],
                tok,
                cap: mods.softcap.map(T::from_f64),
                slope: mods
                    .alibi
                    .map(|slopes| T::from_f64(slopes[bh % cache.heads])),
                bias: mods.bias.map(|bias| (bias, bh % cache.heads)),
            };
            let kv = cache.kv_slice(bh) * cap * d;
            let kv = (&k[kv..kv + cap * d], &v[kv..kv + cap * d]);
            let q_row = &q[row * d..(row + 1) * d];
            chunk_partial(q_row, kv, layout, entries.clone(), key, scale, scores)
        })
        .collect();
    out.par_chunks_mut(d)
        .zip(row_tasks.par_iter())
        .for_each(|(out_row, range)| merge(&partials[range.clone()], out_row));
}

/// What a query row may read: its local row in its block's masks and the cached length;
/// its token and the score modifiers of its head (the relative bias with the head).
#[derive(Clone, Copy)]
struct KeyRange<'a, T> {
    local: usize,
    len: usize,
    tok: usize,
    cap: Option<T>,
    slope: Option<T>,
    bias: Option<(RelativeBias<'a>, usize)>,
}

/// The running max, sum and output of one query row over the key blocks `entries`.
fn chunk_partial<T: Real>(
    q: &[T],
    (k, v): (&[T], &[T]),
    layout: &CsrLayout<'_>,
    entries: std::ops::Range<usize>,
    key: KeyRange<'_, T>,
    scale: T,
    scores: &mut Vec<(usize, T)>,
) -> Partial<T> {
    let d = q.len();
    let b = layout.block;
    let mut part = Partial {
        max: T::NEG_INFINITY,
        sum: T::ZERO,
        acc: vec![T::ZERO; d],
    };
    for e in entries {
        let (ks, ke) = layout.block_range(layout.cols[e] as usize);
        let mask = layout.mask_of(e);
        scores.clear();
        // In natural order the cached keys of a block are a prefix of it.
        let ke = if layout.order.is_none() {
            ke.min(key.len)
        } else {
            ke
        };
        for kp in ks..ke {
            let tok = layout.token(kp);
            let bit = key.local * b + (kp - ks);
            let allowed = mask.is_none_or(|m| m[bit / 64] >> (bit % 64) & 1 == 1);
            if allowed && tok < key.len {
                let mut s = dot(q, &k[tok * d..(tok + 1) * d]) * scale;
                if let Some(cap) = key.cap {
                    s = cap * (s * cap.recip()).tanh();
                }
                if let Some(slope) = key.slope {
                    s = s - slope * T::from_usize(key.tok.abs_diff(tok));
                }
                if let Some((bias, head)) = key.bias {
                    s += T::from_f64(bias.value(head, key.tok, tok));
                }
                scores.push((tok, s));
            }
        }
        if scores.is_empty() {
            continue;
        }
        let block_max = scores.iter().fold(T::NEG_INFINITY, |m, &(_, s)| m.max(s));
        let new_max = part.max.max(block_max);
        if new_max > part.max {
            let alpha = (part.max - new_max).exp();
            part.sum *= alpha;
            part.acc.iter_mut().for_each(|a| *a *= alpha);
            part.max = new_max;
        }
        for &(tok, s) in scores.iter() {
            let p = (s - part.max).exp();
            part.sum += p;
            axpy(p, &v[tok * d..(tok + 1) * d], &mut part.acc);
        }
    }
    part
}

/// Writes the merged, normalised output of one row's partials (zeros for none, or for
/// partials that saw no key).
fn merge<T: Real>(parts: &[Partial<T>], out: &mut [T]) {
    let max = parts
        .iter()
        .fold(T::NEG_INFINITY, |m, part| m.max(part.max));
    if parts.is_empty() || max == T::NEG_INFINITY {
        return;
    }
    let mut sum = T::ZERO;
    for part in parts.iter().filter(|part| part.max != T::NEG_INFINITY) {
        let w = (part.max - max).exp();
        sum += part.sum * w;
        axpy(w, &part.acc, out);
    }
    let inv = sum.recip();
    out.iter_mut().for_each(|o| *o *= inv);
}

/// `a . b`, in eight independent lanes (the compiler vectorises them).
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::ZERO; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let tail: T = ar.iter().zip(br).map(|(&x, &y)| x * y).sum();
    lanes.iter().copied().sum::<T>() + tail
}

/// `y += alpha x`.
fn axpy<T: Real>(alpha: T, x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sparse_attn_kernel_types::FULL_BLOCK;

    /// A causal `all` layout of `n` tokens in blocks of `b`: every block at or below the
    /// diagonal, the diagonal ones masked to `j <= i`.
    struct Causal {
        row_ptr: Vec<u32>,
        cols: Vec<u32>,
        masks: Vec<u32>,
        bits: Vec<u64>,
        words: usize,
    }

    fn causal(n: usize, b: usize) -> Causal {
        let nb = n.div_ceil(b);
        let words = (b * b).div_ceil(64);
        let mut bits = vec![0u64; words];
        for i in 0..b {
            for j in 0..=i {
                bits[(i * b + j) / 64] |= 1 << ((i * b + j) % 64);
            }
        }
        let (mut row_ptr, mut cols, mut masks) = (vec![0u32], Vec::new(), Vec::new());
        for r in 0..nb {
            for c in 0..=r {
                cols.push(c as u32);
                masks.push(if c == r { 0 } else { FULL_BLOCK });
            }
            row_ptr.push(cols.len() as u32);
        }
        Causal {
            row_ptr,
            cols,
            masks,
            bits,
            words,
        }
    }

    /// Decoding every token of a long causal row in chunks of keys (many tasks per row)
    /// gives what one pass over the row gives, and padding rows are zero.
    #[test]
    fn split_rows_merge_to_the_one_pass_softmax() {
        let (n, b, d) = (3000, 16, 5);
        let c = causal(n, b);
        let layout = CsrLayout {
            seq_len: n,
            block: b,
            n_blocks: n.div_ceil(b),
            layout_heads: 1,
            row_ptr: &c.row_ptr,
            cols: &c.cols,
            masks: &c.masks,
            col_ptr: &[],
            t_rows: &[],
            t_entries: &[],
            mask_bits: &c.bits,
            mask_words: c.words,
            order: None,
        };
        let value = |x: usize| ((x * 2654435761) % 1000) as f64 / 500.0 - 1.0;
        let k: Vec<f64> = (0..n * d).map(value).collect();
        let v: Vec<f64> = (0..n * d).map(|x| value(x + 7)).collect();
        let q: Vec<f64> = (0..2 * d).map(|x| value(x + 11)).collect();
        let shape = DecodeShape {
            cache: AttentionShape {
                batch: 1,
                heads: 1,
                kv_heads: 1,
                seq_len: n,
                head_dim: d,
            },
            queries: 2,
        };
        let first = 2990;
        let rows = DecodeRows {
            first: &[first],
            valid: &[1],
        };
        let mut out = vec![1.0; 2 * d];
        decode(
            &q,
            &k,
            &v,
            shape,
            &layout,
            None,
            rows,
            0.5,
            ScoreMods::default(),
            &mut out,
        );
        // One pass over keys 0..=first.
        let scores: Vec<f64> = (0..=first)
            .map(|j| 0.5 * dot(&q[..d], &k[j * d..(j + 1) * d]))
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let sum: f64 = weights.iter().sum();
        for t in 0..d {
            let want: f64 = (0..=first).map(|j| weights[j] * v[j * d + t]).sum::<f64>() / sum;
            assert!((out[t] - want).abs() < 1e-12, "{t}: {} vs {want}", out[t]);
        }
        assert!(
            out[d..].iter().all(|&x| x == 0.0),
            "the padding row is zero"
        );
    }
}

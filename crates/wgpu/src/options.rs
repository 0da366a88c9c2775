//! Key padding, attention dropout and the score modifiers inside the kernels.
//!
//! The dropout generator repeats, operation for operation, the counter-based one of
//! `sparse_attn_kernel_types::dropout` (Wellons' `lowbias32` hash chained over the seed's halves,
//! the batch, the query head, the query token and the spread key token), so every backend
//! draws the same mask; the conformance tests compare both against the f64 reference.

use cubecl::prelude::*;

use sparse_attn_kernel_types::KEY_SPREAD;

/// Wellons' `lowbias32` integer hash (wrapping 32-bit arithmetic).
#[cube]
pub(crate) fn mix(x: u32) -> u32 {
    let a = x ^ (x >> 16u32);
    let b = a * 0x7feb_352du32;
    let c = b ^ (b >> 15u32);
    let d = c * 0x846c_a68bu32;
    d ^ (d >> 16u32)
}

/// Key of one `(batch, query head)`.
#[cube]
pub(crate) fn head_key(seed_lo: u32, seed_hi: u32, batch: usize, head: usize) -> u32 {
    let h = mix(seed_lo);
    let h = mix(h ^ seed_hi);
    let h = mix(h ^ (batch as u32));
    mix(h ^ (head as u32))
}

/// Key of query token `tok` under a head key.
#[cube]
pub(crate) fn row_key(head_key: u32, tok: usize) -> u32 {
    mix(head_key ^ (tok as u32))
}

/// The dropout factor of key token `tok` in the row of `row_key`: `keep_scale` if kept, else 0.
#[cube]
pub(crate) fn keep_factor(row_key: u32, tok: usize, threshold: u32, keep_scale: f32) -> f32 {
    if mix(row_key ^ ((tok as u32) * KEY_SPREAD)) >= threshold {
        keep_scale
    } else {
        0.0f32
    }
}

/// Whether token `tok` of batch row `batch` is within its valid length (always, unpadded).
#[cube]
pub(crate) fn in_length(
    lengths: &[u32],
    batch: usize,
    tok: usize,
    #[comptime] padded: bool,
) -> bool {
    let mut ok = true;
    if padded {
        ok = tok < lengths[batch] as usize;
    }
    ok
}

/// What the options make of one query row: its batch row, whether it is a query at all
/// (exists and lies within its batch row's length) and its dropout row key (0 without
/// dropout).
#[derive(CubeType, Clone, Copy)]
pub(crate) struct QueryRow {
    /// Batch row.
    pub batch: usize,
    /// Whether the row attends at all.
    pub ok: bool,
    /// Dropout key of the row.
    pub key: u32,
}

/// The [`QueryRow`] of token `tok` of `(batch, head)` pair `bh` (`valid`: the row exists).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn query_row(
    lengths: &[u32],
    seed_lo: u32,
    seed_hi: u32,
    bh: usize,
    heads: usize,
    tok: usize,
    valid: bool,
    #[comptime] padded: bool,
    #[comptime] dropout: bool,
) -> QueryRow {
    let batch = bh / heads;
    let mut key = 0u32;
    if dropout {
        key = row_key(head_key(seed_lo, seed_hi, batch, bh % heads), tok);
    }
    QueryRow {
        batch,
        ok: valid && in_length(lengths, batch, tok, padded),
        key,
    }
}

/// The score modifiers of one query head: its ALiBi slope, the soft-capping bound and where
/// its relative-position biases are in the modifiers' buffer.
#[derive(CubeType, Clone, Copy)]
pub(crate) struct ScoreMod {
    /// ALiBi slope of the head (0 without ALiBi).
    pub slope: f32,
    /// Soft-capping bound (1 without soft-capping).
    pub cap: f32,
    /// Largest bucketed distance `M` of the relative-position bias (0 without one).
    pub reach: usize,
    /// Offset of the distance -> bucket map (`2M + 1` entries).
    pub map: usize,
    /// Offset of the head's row of the bias table.
    pub table: usize,
}

/// The [`ScoreMod`] of query head `head` of `heads`, read from the modifiers' buffer `data`
/// as [`mods_buffer`](crate::launch::mods_buffer) lays it out: `heads` ALiBi slopes (zeros
/// without ALiBi), then with a relative-position bias `M`, the bucket count, the bucket of
/// each distance `-M..=M` and the `[heads, buckets]` table (integers as exact f32 values).
#[cube]
pub(crate) fn score_mod(
    data: &[f32],
    cap: f32,
    head: usize,
    heads: usize,
    #[comptime] alibi: bool,
    #[comptime] relative: bool,
) -> ScoreMod {
    let mut slope = 0.0f32;
    if alibi {
        slope = data[head];
    }
    let mut reach = 0usize;
    let mut map = 0usize;
    let mut table = 0usize;
    if relative {
        reach = u32::cast_from(data[heads]) as usize;
        let count = u32::cast_from(data[heads + 1]) as usize;
        map = heads + 2;
        table = map + 2 * reach + 1 + head * count;
    }
    ScoreMod {
        slope,
        cap,
        reach,
        map,
        table,
    }
}

/// The relative-position bucket of query token `qtok` and key token `ktok`: the map's entry
/// for `qtok - ktok` clamped to `[-M, M]`.
#[cube]
pub(crate) fn relative_bucket(data: &[f32], qtok: usize, ktok: usize, mods: &ScoreMod) -> usize {
    let m = mods.reach;
    let mut index = m;
    if qtok >= ktok {
        let dist = qtok - ktok;
        index += if dist < m { dist } else { m };
    } else {
        let dist = ktok - qtok;
        index -= if dist < m { dist } else { m };
    }
    u32::cast_from(data[mods.map + index]) as usize
}

/// Largest `|s / cap|` handed to `tanh` (its f32 value is 1 from about 9 on); bounds the
/// argument for devices whose `tanh` overflows on large inputs.
const TANH_ARG_MAX: f32 = 15.0;

/// `tanh(s / cap)`, NaN for NaN.
#[cube]
fn capped_tanh(s: f32, cap: f32) -> f32 {
    f32::tanh(clamp_nan(s / cap, -TANH_ARG_MAX, TANH_ARG_MAX))
}

/// The modified score of the scaled score `s` of query token `qtok` and key token `ktok`
/// (`sparse_attn_kernel_types::ScoreMods`): `cap * tanh(s / cap)` with `softcap`, then
/// `- slope * |qtok - ktok|` with `alibi`, then `+ table[h, bucket]` with `relative` (`data`:
/// the modifiers' buffer of [`score_mod`]).
#[cube]
#[allow(clippy::too_many_arguments)]
pub(crate) fn modify_score(
    s: f32,
    qtok: usize,
    ktok: usize,
    mods: &ScoreMod,
    data: &[f32],
    #[comptime] softcap: bool,
    #[comptime] alibi: bool,
    #[comptime] relative: bool,
) -> f32 {
    let mut x = s;
    if softcap {
        x = mods.cap * capped_tanh(s, mods.cap);
    }
    if alibi {
        // `abs_diff` has no CubeCL expansion.
        #[allow(clippy::manual_abs_diff)]
        let dist = if qtok >= ktok {
            qtok - ktok
        } else {
            ktok - qtok
        };
        x -= mods.slope * f32::cast_from(dist);
    }
    if relative {
        x += data[mods.table + relative_bucket(data, qtok, ktok, mods)];
    }
    x
}

/// `d modify_score / d s` at the scaled score `s`: `1 - tanh²(s / cap)` with `softcap`, else 1.
#[cube]
pub(crate) fn score_grad(s: f32, mods: &ScoreMod, #[comptime] softcap: bool) -> f32 {
    let mut g = 1.0f32;
    if softcap {
        let t = capped_tanh(s, mods.cap);
        g = 1.0 - t * t;
    }
    g
}

//! Per-call options beyond the layout: key padding (valid lengths per batch row) and
//! attention dropout, applied to score and probability tiles inside the kernels.

use crate::dropout::DropoutMask;
use crate::layout::CsrLayout;
use crate::real::Real;

/// Options of one kernel call; the default is plain attention.
#[derive(Debug, Clone, Copy, Default)]
pub struct Extras<'a> {
    /// Valid tokens of each batch row (`batch` entries, each at most `seq_len`): tokens
    /// `>= len` are neither queries (zero output, zero gradients) nor keys.
    pub key_lengths: Option<&'a [usize]>,
    /// Dropout on the attention probabilities.
    pub dropout: Option<DropoutMask>,
}

/// The options as they apply to one `(batch, head)`: its valid length and dropout key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeadExtras<'a> {
    layout: CsrLayout<'a>,
    /// Valid length of this batch row, when it is shorter than the sequence.
    len: Option<usize>,
    dropout: Option<(DropoutMask, u32)>,
}

impl<'a> HeadExtras<'a> {
    pub(crate) fn new(
        extras: &Extras<'_>,
        layout: &CsrLayout<'a>,
        batch: usize,
        head: usize,
    ) -> Self {
        Self {
            layout: *layout,
            len: extras
                .key_lengths
                .map(|lengths| lengths[batch])
                .filter(|&len| len < layout.seq_len),
            dropout: extras.dropout.map(|m| (m, m.head_key(batch, head))),
        }
    }

    /// Whether no query of block `r` is valid (only known cheaply without a token order).
    pub(crate) fn block_past_end(&self, r: usize) -> bool {
        self.layout.order.is_none() && self.len.is_some_and(|len| r * self.layout.block >= len)
    }

    /// Sets the scores of invalid query rows and key columns of the tile (query positions
    /// `qs..qs + bq`, key positions `ks..ks + bk`) to `-inf`.
    pub(crate) fn mask_padding<T: Real>(
        &self,
        s: &mut [T],
        qs: usize,
        bq: usize,
        ks: usize,
        bk: usize,
    ) {
        let Some(len) = self.len else { return };
        let valid = |p: usize| self.layout.token(p) < len;
        for (i, row) in s.chunks_mut(bk).take(bq).enumerate() {
            if !valid(qs + i) {
                row.fill(T::NEG_INFINITY);
                continue;
            }
            for (j, x) in row.iter_mut().enumerate() {
                if !valid(ks + j) {
                    *x = T::NEG_INFINITY;
                }
            }
        }
    }

    /// Applies dropout to a probability-shaped tile in place: dropped pairs become 0, kept
    /// ones are multiplied by `1 / (1 - p)`.
    pub(crate) fn drop<T: Real>(&self, t: &mut [T], qs: usize, bq: usize, ks: usize, bk: usize) {
        let Some((mask, head_key)) = self.dropout else {
            return;
        };
        let scale = T::from_f64(mask.scale());
        for (i, row) in t.chunks_mut(bk).take(bq).enumerate() {
            let row_key = DropoutMask::row_key(head_key, self.layout.token(qs + i));
            match self.layout.order {
                None => drop_contiguous(row, &mask, row_key, ks, scale),
                Some(order) => {
                    for (x, &tok) in row.iter_mut().zip(&order[ks..ks + bk]) {
                        *x = if mask.keeps(row_key, tok) {
                            *x * scale
                        } else {
                            T::ZERO
                        };
                    }
                }
            }
        }
    }
}

/// Dropout of one row whose key tokens are `first, first + 1, ...`: a branch-free loop of
/// 32-bit hashes that the compiler vectorises; with AVX2 (detected at run time) eight
/// hashes per instruction.
fn drop_contiguous<T: Real>(
    row: &mut [T],
    mask: &DropoutMask,
    row_key: u32,
    first: usize,
    scale: T,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available on this CPU (checked just above).
        unsafe { drop_contiguous_avx2(row, mask, row_key, first, scale) };
        return;
    }
    drop_contiguous_portable(row, mask, row_key, first, scale);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn drop_contiguous_avx2<T: Real>(
    row: &mut [T],
    mask: &DropoutMask,
    row_key: u32,
    first: usize,
    scale: T,
) {
    drop_contiguous_portable(row, mask, row_key, first, scale);
}

#[inline(always)]
fn drop_contiguous_portable<T: Real>(
    row: &mut [T],
    mask: &DropoutMask,
    row_key: u32,
    first: usize,
    scale: T,
) {
    for (j, x) in row.iter_mut().enumerate() {
        *x = if mask.keeps(row_key, first + j) {
            *x * scale
        } else {
            T::ZERO
        };
    }
}

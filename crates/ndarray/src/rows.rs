//! Output rows of one head (the forward's output and log-sum-exp, the backward's
//! gradients), written block by block in layout positions, whether the head is stored in
//! positions (contiguous) or in token order under a permuted layout.
//!
//! Under a permuted layout the rows of a position block are scattered over the head's
//! token-ordered tensor: rather than computing a whole head in position order into a
//! buffer of its own and scattering it afterwards (for the backward, three `[n, d]` buffers
//! per task: 48 MiB per head at n = 65536, d = 64), each block is staged in a
//! `block x width` buffer, updated and written straight back. The rows are borrowed as
//! distinct `&mut` slices, so no two tasks can write the same row.

use rayon::iter::Either;
use rayon::prelude::*;

use crate::real::Real;

/// The `[n, width]` output of one head (or key/value head), addressed by layout position.
pub(crate) enum PositionRows<'a, T> {
    /// Stored in position order (no token order, or positions are tokens).
    Contiguous { rows: &'a mut [T], width: usize },
    /// Stored in token order: entry `p` is the row of token `order[p]`.
    Scattered(Vec<&'a mut [T]>),
}

impl<'a, T: Real> PositionRows<'a, T> {
    /// `rows` (`[n, width]`, token order, `width > 0`) addressed through `order` (position
    /// `p` holds token `order[p]`), or directly without an order.
    ///
    /// # Panics
    /// If `order` is not a permutation of the rows, or `width` is 0.
    pub(crate) fn new(rows: &'a mut [T], width: usize, order: Option<&[usize]>) -> Self {
        assert!(width > 0, "PositionRows: rows of no elements");
        let Some(order) = order else {
            return Self::Contiguous { rows, width };
        };
        let mut tokens: Vec<Option<&mut [T]>> = rows.chunks_exact_mut(width).map(Some).collect();
        Self::Scattered(
            order
                .iter()
                .map(|&t| tokens[t].take().expect("a layout order is a permutation"))
                .collect(),
        )
    }

    /// The blocks of `block` positions (the last one possibly shorter) that start in
    /// `blocks`, one item per block, in parallel.
    pub(crate) fn par_blocks(
        &mut self,
        block: usize,
        blocks: std::ops::Range<usize>,
    ) -> impl IndexedParallelIterator<Item = PositionBlock<'_, 'a, T>> {
        match self {
            Self::Contiguous { rows, width } => {
                let n = rows.len() / *width;
                let span = blocks.start * block * *width..(blocks.end * block).min(n) * *width;
                Either::Left(
                    rows[span]
                        .par_chunks_mut(block * *width)
                        .map(PositionBlock::Contiguous),
                )
            }
            Self::Scattered(rows) => {
                let span = blocks.start * block..(blocks.end * block).min(rows.len());
                Either::Right(
                    rows[span]
                        .par_chunks_mut(block)
                        .map(PositionBlock::Scattered),
                )
            }
        }
    }
}

/// One block of [`PositionRows`].
pub(crate) enum PositionBlock<'r, 'a, T> {
    /// The block's rows, contiguous.
    Contiguous(&'r mut [T]),
    /// The block's rows, one slice each.
    Scattered(&'r mut [&'a mut [T]]),
}

impl<T: Real> PositionBlock<'_, '_, T> {
    /// Runs `update` on the block's rows as one contiguous `[rows, width]` slice holding the
    /// block's current values, or, when `fresh`, anything (`update` must then write every
    /// element); a scattered block goes through `staging` and is written back afterwards.
    pub(crate) fn update(self, fresh: bool, staging: &mut Vec<T>, update: impl FnOnce(&mut [T])) {
        match self {
            Self::Contiguous(rows) => update(rows),
            Self::Scattered(rows) => {
                let width = rows.first().map_or(0, |row| row.len());
                staging.clear();
                if fresh {
                    staging.resize(rows.len() * width, T::ZERO);
                } else {
                    rows.iter().for_each(|row| staging.extend_from_slice(row));
                }
                update(staging);
                for (row, values) in rows.iter_mut().zip(staging.chunks_exact(width)) {
                    row.copy_from_slice(values);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::PositionRows;

    /// Every block of a scattered head writes the rows of its positions' tokens, and sees
    /// their current values unless fresh.
    #[test]
    fn scattered_blocks_write_their_tokens() {
        let order = [3, 0, 4, 1, 2];
        let mut tokens: Vec<f32> = (0..10).map(|x| x as f32).collect();
        let mut rows = PositionRows::new(&mut tokens, 2, Some(&order));
        rows.par_blocks(2, 0..3).enumerate().for_each(|(i, block)| {
            let mut staging = Vec::new();
            block.update(i == 1, &mut staging, |values| {
                for x in values.iter_mut() {
                    *x = if i == 1 { 100.0 } else { *x + 100.0 };
                }
            });
        });
        // Positions 2 and 3 (tokens 4 and 1) were written fresh.
        let want = [100., 101., 100., 100., 104., 105., 106., 107., 100., 100.];
        assert_eq!(tokens, want);
    }

    #[test]
    fn contiguous_blocks_cover_a_column_range() {
        let mut values = vec![1.0f64; 7];
        let mut rows = PositionRows::new(&mut values, 1, None);
        let blocks: Vec<usize> = rows
            .par_blocks(3, 1..3)
            .map(|block| {
                let mut len = 0;
                block.update(true, &mut Vec::new(), |v| {
                    len = v.len();
                    v.fill(0.0);
                });
                len
            })
            .collect();
        assert_eq!(blocks, [3, 1]);
        assert_eq!(values, [1., 1., 1., 0., 0., 0., 0.]);
    }
}

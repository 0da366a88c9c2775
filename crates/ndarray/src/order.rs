//! Layouts with a token order (the strided pattern groups tokens by residue): the kernels
//! take and return tensors in token order and work in layout positions inside.
//!
//! Position `p` of a layout holds token `order[p]`. The forward pass gathers one head's
//! rows at a time into buffers its task reuses, the backward pass through the contribution
//! store one key/value head per task and one query block's rows at a time, so a permuted
//! layout costs no full-size copies of the inputs; only the backward's recompute fallback
//! gathers whole tensors. Outputs are written block by block to their tokens' rows
//! ([`crate::rows`]).

use rayon::prelude::*;

use crate::real::Real;

/// `dst` row `p` = `src` row `order[p]` (rows of `width`; `dst` holds `order.len()` rows).
pub(crate) fn to_positions<T: Real>(src: &[T], order: &[usize], width: usize, dst: &mut [T]) {
    for (dst, &token) in dst.chunks_exact_mut(width).zip(order) {
        dst.copy_from_slice(&src[token * width..(token + 1) * width]);
    }
}

/// `dst` row `order[p]` = `src` row `p`: the inverse of [`to_positions`].
pub(crate) fn to_tokens<T: Real>(src: &[T], order: &[usize], width: usize, dst: &mut [T]) {
    for (src, &token) in src.chunks_exact(width).zip(order) {
        dst[token * width..(token + 1) * width].copy_from_slice(src);
    }
}

/// `dst` = the rows `index[i]` of `src` (rows of `width`), replacing its contents and
/// reusing its capacity, in parallel over chunks of rows; never zero-filled first.
pub(crate) fn gather_into<T: Real>(src: &[T], index: &[usize], width: usize, dst: &mut Vec<T>) {
    const ROWS: usize = 256;
    let len = index.len() * width;
    dst.clear();
    dst.reserve(len);
    if width > 0 {
        dst.spare_capacity_mut()[..len]
            .par_chunks_mut(ROWS * width)
            .zip(index.par_chunks(ROWS))
            .for_each(|(dst, index)| {
                for (dst, &row) in dst.chunks_exact_mut(width).zip(index) {
                    for (x, &y) in dst.iter_mut().zip(&src[row * width..(row + 1) * width]) {
                        x.write(y);
                    }
                }
            });
    }
    // SAFETY: the tasks above wrote the first `len` elements (one row per index).
    unsafe { dst.set_len(len) };
}

/// `dst` = the rows `index[i]` of `src` (rows of `width`), replacing its contents and
/// reusing its capacity, sequentially (a block's rows, inside a task).
pub(crate) fn extend_rows<T: Real>(src: &[T], index: &[usize], width: usize, dst: &mut Vec<T>) {
    dst.clear();
    for &row in index {
        dst.extend_from_slice(&src[row * width..(row + 1) * width]);
    }
}

/// Every `n`-row slice of `src` (token order) in position order, one task per slice.
pub(crate) fn all_to_positions<T: Real>(src: &[T], order: &[usize], width: usize) -> Vec<T> {
    let slice = order.len() * width;
    let mut dst = crate::buffer::zeroed(src.len());
    if slice > 0 {
        dst.par_chunks_mut(slice)
            .zip(src.par_chunks(slice))
            .for_each(|(dst, src)| to_positions(src, order, width, dst));
    }
    dst
}

/// Every `n`-row slice of `src` (position order) written to `dst` in token order.
pub(crate) fn all_to_tokens<T: Real>(src: &[T], order: &[usize], width: usize, dst: &mut [T]) {
    let slice = order.len() * width;
    if slice > 0 {
        dst.par_chunks_mut(slice)
            .zip(src.par_chunks(slice))
            .for_each(|(dst, src)| to_tokens(src, order, width, dst));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn gather_into_replaces_and_reuses() {
        let src: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let mut dst = vec![7.0; 100];
        super::gather_into(&src, &[3, 0, 2], 3, &mut dst);
        assert_eq!(dst, [9.0, 10.0, 11.0, 0.0, 1.0, 2.0, 6.0, 7.0, 8.0]);
        let rows: Vec<usize> = (0..600).map(|i| (i * 7) % 4).collect();
        super::gather_into(&src, &rows, 3, &mut dst);
        assert_eq!(dst.len(), 1800);
        for (i, &row) in rows.iter().enumerate() {
            assert_eq!(&dst[i * 3..i * 3 + 3], &src[row * 3..row * 3 + 3]);
        }
    }

    #[test]
    fn positions_and_tokens_are_inverse() {
        let order = [2, 0, 3, 1];
        let src: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let positions = super::all_to_positions(&src, &order, 2);
        assert_eq!(&positions[..8], &[4.0, 5.0, 0.0, 1.0, 6.0, 7.0, 2.0, 3.0]);
        let mut back = vec![0.0; 16];
        super::all_to_tokens(&positions, &order, 2, &mut back);
        assert_eq!(back, src);
    }
}

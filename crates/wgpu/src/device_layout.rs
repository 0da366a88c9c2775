//! A block layout on one device: its CSR arrays checked once, uploaded once, and reused by
//! every launch on that device.
//!
//! The kernels index the layout's arrays without bounds checks (see [`crate::forward`]), so
//! a [`CsrLayout`] is checked in full before it is uploaded; a caller keeps the
//! [`DeviceLayout`] next to the layout it came from (`sparse-attn-core` attaches it to its
//! `BlockLayout`, one per device) and pays for neither the check nor the upload again.

use cubecl::client::Client;
use cubecl::prelude::*;
use cubecl::server::Handle;

use crate::error::KernelError;
use sparse_attn_kernel_types::{CsrLayout, FULL_BLOCK as FULL};

/// A device buffer and its element count.
pub(crate) type Buffer = (Handle, usize);

/// A checked block layout's arrays on one device (WGSL has no 64-bit integers: the mask
/// bitmaps go as `u32` words).
///
/// # Invariants
/// Checked by [`DeviceLayout::upload`] from the view it was built from:
/// - `n_blocks = seq_len.div_ceil(block)`, `seq_len` and every token fit in `u32`;
/// - `row_ptr` and `col_ptr` have `layout_heads * n_blocks + 1` non-decreasing entries from
///   0 to the number of active blocks (`cols.len() == masks.len() == t_rows.len() ==
///   t_entries.len()`);
/// - every column and transposed row is below `n_blocks`, every transposed entry indexes
///   `cols`, every mask is full or names a bitmap of `mask_words` 64-bit words;
/// - the order, if any, is a permutation of `0..seq_len`.
pub struct DeviceLayout {
    pub(crate) seq_len: usize,
    pub(crate) block: usize,
    pub(crate) n_blocks: usize,
    pub(crate) layout_heads: usize,
    pub(crate) mask_words: usize,
    pub(crate) permuted: bool,
    pub(crate) row_ptr: Buffer,
    pub(crate) cols: Buffer,
    pub(crate) masks: Buffer,
    pub(crate) mask_bits: Buffer,
    pub(crate) order: Buffer,
    pub(crate) col_ptr: Buffer,
    pub(crate) t_rows: Buffer,
    pub(crate) t_entries: Buffer,
}

impl std::fmt::Debug for DeviceLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLayout")
            .field("seq_len", &self.seq_len)
            .field("block", &self.block)
            .field("layout_heads", &self.layout_heads)
            .field("active_blocks", &self.cols.1)
            .field("permuted", &self.permuted)
            .finish_non_exhaustive()
    }
}

/// Uploads `data` (at least one element, so that no binding is empty).
pub(crate) fn upload(client: &Client, data: &[u32]) -> Buffer {
    let data = if data.is_empty() { &[0u32][..] } else { data };
    (client.create_from_slice(u32::as_bytes(data)), data.len())
}

impl DeviceLayout {
    /// Checks `view` against the invariants above and uploads its arrays to `client`'s
    /// device.
    ///
    /// # Errors
    /// [`KernelError::Layout`] naming the first array that breaks an invariant.
    pub fn upload(client: &Client, view: &CsrLayout) -> Result<Self, KernelError> {
        check(view)?;
        let bits: Vec<u32> = view
            .mask_bits
            .iter()
            .flat_map(|w| [*w as u32, (*w >> 32) as u32])
            .collect();
        let order: Vec<u32> = view
            .order
            .map(|o| o.iter().map(|&t| t as u32).collect())
            .unwrap_or_default();
        Ok(Self {
            seq_len: view.seq_len,
            block: view.block,
            n_blocks: view.n_blocks,
            layout_heads: view.layout_heads,
            mask_words: view.mask_words,
            permuted: view.order.is_some(),
            row_ptr: upload(client, view.row_ptr),
            cols: upload(client, view.cols),
            masks: upload(client, view.masks),
            mask_bits: upload(client, &bits),
            order: upload(client, &order),
            col_ptr: upload(client, view.col_ptr),
            t_rows: upload(client, view.t_rows),
            t_entries: upload(client, view.t_entries),
        })
    }

    /// Sequence length in tokens.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Block size in tokens.
    pub fn block(&self) -> usize {
        self.block
    }

    /// 1 when every head shares the layout, else the number of heads.
    pub fn layout_heads(&self) -> usize {
        self.layout_heads
    }
}

fn broken(reason: String) -> KernelError {
    KernelError::Layout { reason }
}

/// `ptr` holds `rows + 1` non-decreasing offsets from 0 to `entries`.
fn check_pointers(name: &str, ptr: &[u32], rows: usize, entries: usize) -> Result<(), KernelError> {
    if ptr.len() != rows + 1 {
        return Err(broken(format!(
            "`{name}` has {} entries, expected layout_heads * n_blocks + 1 = {}",
            ptr.len(),
            rows + 1
        )));
    }
    if ptr[0] != 0 || ptr[rows] as usize != entries {
        return Err(broken(format!(
            "`{name}` runs from {} to {}, expected 0 to the {entries} active blocks",
            ptr[0], ptr[rows]
        )));
    }
    if let Some(i) = ptr.windows(2).position(|w| w[0] > w[1]) {
        return Err(broken(format!(
            "`{name}` decreases after entry {i}: expected non-decreasing offsets"
        )));
    }
    Ok(())
}

/// The first entry of `values` at or above `bound`, as an error.
fn check_below(name: &str, values: &[u32], bound: usize, what: &str) -> Result<(), KernelError> {
    match values.iter().position(|&x| x as usize >= bound) {
        Some(i) => Err(broken(format!(
            "`{name}[{i}]` is {}, expected below {what} = {bound}",
            values[i]
        ))),
        None => Ok(()),
    }
}

/// Every invariant of [`DeviceLayout`] on `view`.
fn check(view: &CsrLayout) -> Result<(), KernelError> {
    let max = u32::MAX as usize;
    if view.block == 0 || view.seq_len == 0 || view.layout_heads == 0 {
        return Err(broken(format!(
            "block {}, seq_len {} and layout_heads {} must all be positive",
            view.block, view.seq_len, view.layout_heads
        )));
    }
    if view.seq_len > max {
        return Err(broken(format!(
            "seq_len {} is beyond the kernels' 32-bit tokens (at most {max})",
            view.seq_len
        )));
    }
    if view.n_blocks != view.seq_len.div_ceil(view.block) {
        return Err(broken(format!(
            "n_blocks is {}, expected seq_len.div_ceil(block) = {}",
            view.n_blocks,
            view.seq_len.div_ceil(view.block)
        )));
    }
    let expected_words = (view.block * view.block).div_ceil(64);
    if view.mask_words != expected_words {
        return Err(broken(format!(
            "mask_words is {}, expected (block * block).div_ceil(64) = {expected_words}",
            view.mask_words
        )));
    }
    let entries = view.cols.len();
    for (name, len) in [
        ("masks", view.masks.len()),
        ("t_rows", view.t_rows.len()),
        ("t_entries", view.t_entries.len()),
    ] {
        if len != entries {
            return Err(broken(format!(
                "`{name}` has {len} entries, expected one per active block ({entries})"
            )));
        }
    }
    let rows = view.layout_heads * view.n_blocks;
    check_pointers("row_ptr", view.row_ptr, rows, entries)?;
    check_pointers("col_ptr", view.col_ptr, rows, entries)?;
    check_below("cols", view.cols, view.n_blocks, "n_blocks")?;
    check_below("t_rows", view.t_rows, view.n_blocks, "n_blocks")?;
    check_below("t_entries", view.t_entries, entries, "the active blocks")?;
    if !view.mask_bits.len().is_multiple_of(view.mask_words) {
        return Err(broken(format!(
            "`mask_bits` has {} words, expected a multiple of mask_words = {}",
            view.mask_bits.len(),
            view.mask_words
        )));
    }
    let bitmaps = view.mask_bits.len() / view.mask_words;
    if let Some(i) = view
        .masks
        .iter()
        .position(|&m| m != FULL && m as usize >= bitmaps)
    {
        return Err(broken(format!(
            "`masks[{i}]` is {}, expected u32::MAX (full) or a bitmap below {bitmaps}",
            view.masks[i]
        )));
    }
    if let Some(order) = view.order {
        let mut seen = vec![false; view.seq_len];
        if order.len() != view.seq_len {
            return Err(broken(format!(
                "`order` has {} tokens, expected seq_len = {}",
                order.len(),
                view.seq_len
            )));
        }
        for (p, &t) in order.iter().enumerate() {
            if t >= view.seq_len || std::mem::replace(&mut seen[t], true) {
                return Err(broken(format!(
                    "`order[{p}]` is {t}: expected a permutation of 0..{}",
                    view.seq_len
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two blocks of 4 tokens, causal: (0,0) masked, (1,0) full, (1,1) masked.
    struct Arrays {
        row_ptr: Vec<u32>,
        cols: Vec<u32>,
        masks: Vec<u32>,
        col_ptr: Vec<u32>,
        t_rows: Vec<u32>,
        t_entries: Vec<u32>,
        mask_bits: Vec<u64>,
        order: Vec<usize>,
    }

    fn causal() -> Arrays {
        Arrays {
            row_ptr: vec![0, 1, 3],
            cols: vec![0, 0, 1],
            masks: vec![0, FULL, 0],
            col_ptr: vec![0, 2, 3],
            t_rows: vec![0, 1, 1],
            t_entries: vec![0, 1, 2],
            mask_bits: vec![0x8ce],
            order: vec![3, 1, 0, 2, 4, 5, 7, 6],
        }
    }

    fn view(a: &Arrays) -> CsrLayout<'_> {
        CsrLayout {
            seq_len: 8,
            block: 4,
            n_blocks: 2,
            layout_heads: 1,
            row_ptr: &a.row_ptr,
            cols: &a.cols,
            masks: &a.masks,
            col_ptr: &a.col_ptr,
            t_rows: &a.t_rows,
            t_entries: &a.t_entries,
            mask_bits: &a.mask_bits,
            mask_words: 1,
            order: Some(&a.order),
        }
    }

    fn reason<'a>(a: &'a Arrays, edit: impl FnOnce(&mut CsrLayout<'a>)) -> String {
        let mut v = view(a);
        edit(&mut v);
        match check(&v) {
            Err(KernelError::Layout { reason }) => reason,
            other => panic!("expected a layout error, got {other:?}"),
        }
    }

    #[test]
    fn a_consistent_view_passes() {
        assert_eq!(check(&view(&causal())), Ok(()));
        let a = causal();
        let mut v = view(&a);
        v.order = None;
        assert_eq!(check(&v), Ok(()));
    }

    #[test]
    fn every_broken_array_is_named() {
        let a = causal();
        assert!(reason(&a, |v| v.n_blocks = 3).contains("n_blocks"));
        assert!(reason(&a, |v| v.mask_words = 2).contains("mask_words"));
        assert!(reason(&a, |v| v.block = 0).contains("positive"));
        assert!(reason(&a, |v| v.row_ptr = &[0, 1]).contains("row_ptr"));
        assert!(reason(&a, |v| v.row_ptr = &[0, 2, 1]).contains("row_ptr"));
        assert!(reason(&a, |v| v.row_ptr = &[0, 3, 2]).contains("row_ptr"));
        assert!(reason(&a, |v| v.col_ptr = &[1, 2, 3]).contains("col_ptr"));
        assert!(reason(&a, |v| v.cols = &[0, 2, 1]).contains("cols[1]"));
        assert!(reason(&a, |v| v.masks = &[0, 1, 0]).contains("masks[1]"));
        assert!(reason(&a, |v| v.masks = &[0, 0]).contains("masks"));
        assert!(reason(&a, |v| v.t_rows = &[0, 1, 5]).contains("t_rows[2]"));
        assert!(reason(&a, |v| v.t_entries = &[0, 3, 2]).contains("t_entries[1]"));
        let bad_order = [3, 1, 0, 2, 4, 5, 7, 7];
        assert!(reason(&a, |v| v.order = Some(&bad_order)).contains("order[7]"));
        let short_order = [0, 1];
        assert!(reason(&a, |v| v.order = Some(&short_order)).contains("order"));
        let out_of_range = [3, 1, 0, 2, 4, 5, 7, 8];
        assert!(reason(&a, |v| v.order = Some(&out_of_range)).contains("permutation"));
    }
}

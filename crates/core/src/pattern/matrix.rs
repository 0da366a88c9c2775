//! A pattern given as a boolean block matrix (DeepSpeed-style explicit layouts).

use std::ops::Range;

use super::{BlockCover, Geometry, Pattern};
use crate::error::{Result, SparseAttentionError, invalid};

/// Query block `i / block` may attend key block `j / block` iff the matrix says so; one
/// matrix shared by every head, or one per head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMatrix {
    block: usize,
    n_blocks: usize,
    /// Row-major `[heads, n_blocks, n_blocks]`, `heads` being 1 for a shared matrix.
    cells: Vec<bool>,
    heads: usize,
}

impl BlockMatrix {
    /// One `n_blocks x n_blocks` matrix (`rows[q][k]`) over blocks of `block` tokens.
    ///
    /// # Errors
    /// If `block` is 0 or the rows are not square.
    pub fn new(block: usize, rows: &[Vec<bool>]) -> Result<Self> {
        Self::per_head(block, std::slice::from_ref(&rows.to_vec()))
    }

    /// One matrix per head, all `n_blocks x n_blocks`.
    ///
    /// # Errors
    /// If `block` is 0, no matrix is given, or a matrix is not square or of another size.
    pub fn per_head(block: usize, heads: &[Vec<Vec<bool>>]) -> Result<Self> {
        if block == 0 {
            return Err(invalid("block_matrix", "block must be at least 1, got 0"));
        }
        let n_blocks = heads.first().map_or(0, Vec::len);
        if n_blocks == 0 {
            return Err(invalid(
                "block_matrix",
                "expected at least one non-empty matrix",
            ));
        }
        let mut cells = Vec::with_capacity(heads.len() * n_blocks * n_blocks);
        for (h, m) in heads.iter().enumerate() {
            for (r, row) in m.iter().enumerate() {
                if m.len() != n_blocks || row.len() != n_blocks {
                    return Err(invalid(
                        "block_matrix",
                        format!(
                            "head {h} row {r}: expected a {n_blocks} x {n_blocks} matrix, got {} rows of {}",
                            m.len(),
                            row.len()
                        ),
                    ));
                }
                cells.extend_from_slice(row);
            }
        }
        Ok(Self {
            block,
            n_blocks,
            cells,
            heads: heads.len(),
        })
    }

    fn cell(&self, head: usize, q: usize, k: usize) -> bool {
        let h = if self.heads == 1 { 0 } else { head };
        self.cells[(h * self.n_blocks + q) * self.n_blocks + k]
    }
}

impl Pattern for BlockMatrix {
    fn name(&self) -> String {
        format!(
            "block_matrix({}x{}, b={})",
            self.n_blocks, self.n_blocks, self.block
        )
    }
    fn allows(&self, head: usize, i: usize, j: usize) -> bool {
        self.cell(head, i / self.block, j / self.block)
    }
    fn head_dependent(&self) -> bool {
        self.heads > 1
    }
    fn validate(&self, seq_len: usize, heads: usize) -> Result<()> {
        let needed = seq_len.div_ceil(self.block);
        if needed != self.n_blocks {
            return Err(SparseAttentionError::LayoutMismatch {
                what: "number of blocks (block matrix)",
                layout: self.n_blocks,
                input: needed,
            });
        }
        if self.heads != 1 && self.heads != heads {
            return Err(SparseAttentionError::LayoutMismatch {
                what: "heads (block matrix)",
                layout: self.heads,
                input: heads,
            });
        }
        Ok(())
    }
    fn candidate_blocks(&self, head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let q = geom.block_range(q_block);
        for qb in q.start / self.block..=(q.end - 1) / self.block {
            for kb in (0..self.n_blocks).filter(|&kb| self.cell(head, qb, kb)) {
                out.extend(geom.blocks_of(kb * self.block..(kb + 1) * self.block));
            }
        }
    }
    fn cover(&self, head: usize, q: Range<usize>, k: Range<usize>, geom: Geometry) -> BlockCover {
        if geom.block == self.block {
            let on = self.cell(head, q.start / self.block, k.start / self.block);
            if on {
                BlockCover::Full
            } else {
                BlockCover::Empty
            }
        } else {
            BlockCover::Scan
        }
    }
}

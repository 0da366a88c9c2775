//! Text pictures and density statistics of a layout.

use std::fmt::Write;

use crate::error::Result;
use crate::layout::{BlockLayout, FULL};

/// Counts of one layout head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayoutStats {
    /// Active blocks.
    pub active_blocks: usize,
    /// Active blocks with no mask.
    pub full_blocks: usize,
    /// Active blocks with an element mask.
    pub partial_blocks: usize,
    /// Allowed `(query, key)` pairs.
    pub allowed_pairs: u64,
    /// `allowed_pairs / seq_len^2`.
    pub density: f64,
    /// `active_blocks / n_blocks^2`.
    pub block_density: f64,
}

impl BlockLayout {
    /// Statistics of `head`'s layout.
    ///
    /// # Errors
    /// [`crate::SparseAttentionError::OutOfRange`] for a head beyond the layout's heads.
    pub fn stats(&self, head: usize) -> Result<LayoutStats> {
        self.check_head(head)?;
        let (n, b, nb) = (self.seq_len(), self.block(), self.n_blocks());
        let (_, _, _, _, _, _, bits, words) = self.raw();
        let (mut active, mut full, mut pairs) = (0, 0, 0u64);
        for r in 0..nb {
            let bq = (n - r * b).min(b);
            for (c, m) in self.row(head, r) {
                let bk = (n - c * b).min(b);
                active += 1;
                if m == FULL {
                    full += 1;
                    pairs += (bq * bk) as u64;
                } else {
                    let mask = &bits[m as usize * words..(m as usize + 1) * words];
                    pairs += (0..bq)
                        .flat_map(|i| (0..bk).map(move |j| i * b + j))
                        .filter(|bit| mask[bit / 64] >> (bit % 64) & 1 == 1)
                        .count() as u64;
                }
            }
        }
        Ok(LayoutStats {
            active_blocks: active,
            full_blocks: full,
            partial_blocks: active - full,
            allowed_pairs: pairs,
            density: pairs as f64 / (n as f64 * n as f64),
            block_density: active as f64 / (nb as f64 * nb as f64),
        })
    }

    /// A text picture of `head`'s block layout: `#` full, `+` partial, `.` empty; at most
    /// `max_side` characters per side (blocks are merged when there are more; a cell shows
    /// the strongest block it merges).
    ///
    /// # Errors
    /// As [`BlockLayout::stats`].
    pub fn picture(&self, head: usize, max_side: usize) -> Result<String> {
        let s = self.stats(head)?;
        let nb = self.n_blocks();
        let step = nb.div_ceil(max_side.max(1));
        let side = nb.div_ceil(step);
        let mut cells = vec![0u8; side * side];
        for r in 0..nb {
            for (c, m) in self.row(head, r) {
                let cell = &mut cells[(r / step) * side + c / step];
                *cell = (*cell).max(if m == FULL { 2 } else { 1 });
            }
        }
        let mut out = format!(
            "{} (n={}, b={}, head {head}): {} active blocks ({} full, {} partial), density {:.4}\n",
            self.pattern_name(),
            self.seq_len(),
            self.block(),
            s.active_blocks,
            s.full_blocks,
            s.partial_blocks,
            s.density
        );
        if self.order().is_some() {
            out.push_str("(tokens regrouped: rows and columns are layout positions)\n");
        }
        for row in cells.chunks(side) {
            let line: String = row
                .iter()
                .map(|&x| [b'.', b'+', b'#'][x as usize] as char)
                .collect();
            let _ = writeln!(out, "{line}");
        }
        Ok(out)
    }
}

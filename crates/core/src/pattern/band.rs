//! Band patterns: causal (`all`), `local`, sliding windows, dense, dilated windows.

use std::ops::Range;

use super::{
    BlockCover, Geometry, Pattern, StreamWindow, band_blocks, band_cover, saturating_offset,
};
use crate::error::{Result, invalid};

/// Key `j` allowed for query `i` iff `lo <= i - j <= hi`.
///
/// Covers the Sparse Transformer's `all` ([`Band::causal`]) and `local` ([`Band::local`])
/// modes, causal and bidirectional sliding windows and dense attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Band {
    lo: i64,
    hi: i64,
    name: &'static str,
}

impl Band {
    /// `j <= i`: mode `all` of the Sparse Transformer.
    pub fn causal() -> Self {
        Self {
            lo: 0,
            hi: i64::MAX,
            name: "all",
        }
    }

    /// Every pair: dense bidirectional attention (the bidirectional `all`).
    pub fn dense() -> Self {
        Self {
            lo: i64::MIN,
            hi: i64::MAX,
            name: "dense",
        }
    }

    /// `0 <= i - j <= ctx - 1`: mode `local` (`ctx` keys including the query itself).
    ///
    /// # Errors
    /// If `ctx` is 0.
    pub fn local(ctx: usize) -> Result<Self> {
        if ctx == 0 {
            return Err(invalid("local", "local_attn_ctx must be at least 1, got 0"));
        }
        Ok(Self {
            lo: 0,
            hi: saturating_offset(ctx) - 1,
            name: "local",
        })
    }

    /// Causal sliding window of `window` keys (the query and `window - 1` before it).
    ///
    /// # Errors
    /// If `window` is 0.
    pub fn sliding_window(window: usize) -> Result<Self> {
        if window == 0 {
            return Err(invalid(
                "sliding_window",
                "window must be at least 1, got 0",
            ));
        }
        Ok(Self {
            lo: 0,
            hi: saturating_offset(window) - 1,
            name: "sliding_window",
        })
    }

    /// Bidirectional window: `|i - j| <= radius` (the bidirectional `local`).
    pub fn bidirectional_window(radius: usize) -> Self {
        Self {
            lo: -saturating_offset(radius),
            hi: saturating_offset(radius),
            name: "bidirectional_window",
        }
    }

    /// The bidirectional variant of `local(ctx)`: `|i - j| <= ctx - 1`.
    ///
    /// # Errors
    /// If `ctx` is 0.
    pub fn local_bidirectional(ctx: usize) -> Result<Self> {
        if ctx == 0 {
            return Err(invalid("local", "local_attn_ctx must be at least 1, got 0"));
        }
        Ok(Self {
            lo: -(saturating_offset(ctx) - 1),
            hi: saturating_offset(ctx) - 1,
            name: "local_bidirectional",
        })
    }

    /// Smallest and largest allowed `i - j`.
    pub fn offsets(&self) -> (i64, i64) {
        (self.lo, self.hi)
    }
}

impl Pattern for Band {
    fn name(&self) -> String {
        self.name.into()
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        let off = i as i64 - j as i64;
        self.lo <= off && off <= self.hi
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        out.extend(band_blocks(
            geom.block_range(q_block),
            self.lo,
            self.hi,
            geom,
        ));
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        band_cover(self.lo, self.hi, &q, &k)
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        // Causal with a finite reach: `0 <= lo <= i - j <= hi < i64::MAX`.
        (self.lo >= 0 && self.hi < i64::MAX).then(|| StreamWindow {
            sinks: 0,
            reach: usize::try_from(self.hi).map_or(usize::MAX, |hi| hi.saturating_add(1)),
        })
    }
}

/// Dilated window: `i - j` a multiple of `dilation`, at most `(window - 1) * dilation` away
/// (causal: `j <= i`; bidirectional: either side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dilated {
    window: usize,
    dilation: usize,
    causal: bool,
}

impl Dilated {
    /// `window` keys spaced `dilation` apart.
    ///
    /// # Errors
    /// If `window` or `dilation` is 0, or the reach `(window - 1) * dilation` does not fit
    /// in an `i64`.
    pub fn new(window: usize, dilation: usize, causal: bool) -> Result<Self> {
        if window == 0 || dilation == 0 {
            return Err(invalid(
                "dilated",
                format!("window and dilation must be at least 1, got {window} and {dilation}"),
            ));
        }
        let reach = (window - 1).checked_mul(dilation);
        if reach.is_none_or(|r| i64::try_from(r).is_err()) || i64::try_from(dilation).is_err() {
            return Err(invalid(
                "dilated",
                format!(
                    "reach (window - 1) * dilation = ({} * {dilation}) overflows: expected at most {}",
                    window - 1,
                    i64::MAX
                ),
            ));
        }
        Ok(Self {
            window,
            dilation,
            causal,
        })
    }

    fn reach(&self) -> i64 {
        ((self.window - 1) * self.dilation) as i64
    }
}

impl Pattern for Dilated {
    fn name(&self) -> String {
        format!("dilated(w={}, d={})", self.window, self.dilation)
    }
    fn allows(&self, _head: usize, i: usize, j: usize) -> bool {
        let off = i as i64 - j as i64;
        let lo = if self.causal { 0 } else { -self.reach() };
        lo <= off && off <= self.reach() && off % self.dilation as i64 == 0
    }
    fn candidate_blocks(&self, _head: usize, q_block: usize, geom: Geometry, out: &mut Vec<usize>) {
        let lo = if self.causal { 0 } else { -self.reach() };
        out.extend(band_blocks(
            geom.block_range(q_block),
            lo,
            self.reach(),
            geom,
        ));
    }
    fn cover(&self, _head: usize, q: Range<usize>, k: Range<usize>, _geom: Geometry) -> BlockCover {
        let lo = if self.causal { 0 } else { -self.reach() };
        match band_cover(lo, self.reach(), &q, &k) {
            BlockCover::Empty => BlockCover::Empty,
            _ if self.dilation == 1 => band_cover(lo, self.reach(), &q, &k),
            _ => BlockCover::Scan,
        }
    }
    fn stream_window(&self) -> Option<StreamWindow> {
        self.causal.then(|| StreamWindow {
            sinks: 0,
            reach: (self.window - 1) * self.dilation + 1,
        })
    }
}

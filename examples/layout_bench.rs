//! Times building the layout of a one-million-token causal sliding window (b = 64,
//! window 1024): median of 7 builds after one warm-up.
//!
//! `cargo run --release --example layout_bench`

use std::time::Instant;

use sparse_attn::BlockLayout;
use sparse_attn::pattern::Band;

fn main() -> Result<(), sparse_attn::SparseAttentionError> {
    let (n, block) = (1 << 20, 64);
    let pattern = Band::sliding_window(1024)?;
    let mut times = Vec::new();
    let mut layout = BlockLayout::build(&pattern, n, block, 1)?;
    for _ in 0..7 {
        let start = Instant::now();
        layout = BlockLayout::build(&pattern, n, block, 1)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    println!(
        "layout n={n} b={block} causal window 1024: {} active blocks, median build {:.1} ms (min {:.1}, max {:.1})",
        layout.total_active_blocks(),
        times[3],
        times[0],
        times[6]
    );
    Ok(())
}

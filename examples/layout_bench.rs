//! Layout build time and memory as a function of n, for every built-in pattern and the
//! combinators: a markdown table of active blocks, median build time, time per active
//! block, the peak heap the build allocates and the heap the finished layout holds. A
//! builder whose cost follows its active blocks shows flat "ns / block" and "peak B /
//! block" columns from 64k to 1M tokens.
//!
//! `cargo run --release --example layout_bench` (`cargo xtask bench-layout`); `--n` and
//! `--block` pick other sizes. The criterion benchmark (`cargo bench -p sparse-attn-core`)
//! times one of these builds with statistics.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use clap::Parser;
use sparse_attn::BlockLayout;
use sparse_attn::pattern::{
    Band, Dilated, DynPattern, Fixed, Longformer, PerHead, Streaming, Strided, Union,
    VariableWindows,
};

#[path = "common/bigbird.rs"]
mod bigbird;
use bigbird::bench_bigbird;

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

impl Counting {
    fn grew(by: usize) {
        let now = IN_USE.fetch_add(by, Ordering::Relaxed) + by;
        PEAK.fetch_max(now, Ordering::Relaxed);
    }
    /// Starts a measurement: the peak from here on, above what is in use now.
    fn reset() -> usize {
        let now = IN_USE.load(Ordering::Relaxed);
        PEAK.store(now, Ordering::Relaxed);
        now
    }
}

// SAFETY: every call goes to `System` with the caller's arguments unchanged, so `System`'s
// guarantees hold; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc`, the caller's contract passed on.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::alloc_zeroed`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `GlobalAlloc::dealloc`.
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as `GlobalAlloc::realloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            Self::grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

#[derive(Parser)]
struct Args {
    /// Sequence lengths.
    #[arg(long, value_delimiter = ',', default_value = "65536,262144,1048576")]
    n: Vec<usize>,
    /// Block size.
    #[arg(long, default_value_t = 64)]
    block: usize,
    /// Builds timed per cell (the median is reported), after one untimed build.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// Heads of the layouts; the per-head combinator has one pattern per head.
const HEADS: usize = 4;

fn arc(p: impl sparse_attn::pattern::Pattern + 'static) -> DynPattern {
    std::sync::Arc::new(p)
}

/// The patterns of the table at sequence length `n`, each with the layout heads it needs.
fn patterns(
    n: usize,
) -> Result<Vec<(&'static str, DynPattern, usize)>, sparse_attn::SparseAttentionError> {
    let window = || Band::sliding_window(256);
    Ok(vec![
        ("sliding window 256", arc(window()?), 1),
        (
            "bidirectional window 128",
            arc(Band::bidirectional_window(128)),
            1,
        ),
        ("local 256 (paper)", arc(Band::local(256)?), 1),
        ("strided 256 (permuted)", arc(Strided::new(256)?), 1),
        ("fixed 256/1/32", arc(Fixed::new(256, 1, 32)?), 1),
        ("dilated 256 x2", arc(Dilated::new(256, 2, true)?), 1),
        (
            "longformer 256 + 2 globals",
            arc(Longformer::new(256, vec![0, n / 2], true)?),
            1,
        ),
        (
            "bigbird 128 + 2 globals + 2 random",
            arc(bench_bigbird(n)?),
            1,
        ),
        ("streaming 4 sinks + 256", arc(Streaming::new(4, 256)?), 1),
        (
            "variable windows 64..512",
            arc(VariableWindows::new(vec![64, 128, 256, 512], true)?),
            1,
        ),
        (
            "union local + strided (paper strided)",
            arc(Union::new(vec![
                arc(Band::local(256)?),
                arc(Strided::new(256)?),
            ])?),
            1,
        ),
        (
            "per head (4 windows)",
            arc(PerHead::new(
                [64, 128, 256, 512]
                    .into_iter()
                    .map(|w| Band::sliding_window(w).map(arc))
                    .collect::<Result<_, _>>()?,
            )?),
            HEADS,
        ),
    ])
}

fn main() -> Result<(), sparse_attn::SparseAttentionError> {
    let args = Args::parse();
    println!(
        "| pattern | n | active blocks | build ms | ns / block | peak heap MiB | peak B / block | layout MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (index, _) in patterns(args.n[0])?.iter().enumerate() {
        for &n in &args.n {
            let (name, pattern, heads) = patterns(n)?.swap_remove(index);
            // The union scans every block the two parts cannot classify (tens of seconds at
            // 64k tokens): its larger cells would run for hours.
            if name.starts_with("union") && n > args.n[0] {
                println!("| {name} | {n} | | skipped (scan) | | | | |");
                continue;
            }
            // Untimed build: warms caches and measures the peak.
            let base = Counting::reset();
            let layout = BlockLayout::build(pattern.as_ref(), n, args.block, heads)?;
            let peak = PEAK.load(Ordering::Relaxed) - base;
            let held = IN_USE.load(Ordering::Relaxed) - base;
            let blocks = layout.total_active_blocks();
            drop(layout);
            let mut times: Vec<f64> = (0..args.reps.max(1))
                .map(|_| {
                    let start = Instant::now();
                    let layout = BlockLayout::build(pattern.as_ref(), n, args.block, heads);
                    let ms = start.elapsed().as_secs_f64() * 1e3;
                    drop(layout);
                    ms
                })
                .collect();
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let mib = |bytes: usize| bytes as f64 / (1024.0 * 1024.0);
            println!(
                "| {name} | {n} | {blocks} | {ms:.1} | {:.1} | {:.1} | {:.0} | {:.1} |",
                ms * 1e6 / blocks.max(1) as f64,
                mib(peak),
                peak as f64 / blocks.max(1) as f64,
                mib(held),
            );
        }
    }
    Ok(())
}

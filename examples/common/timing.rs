//! Wall-clock medians for the benchmark examples.

use std::time::{Duration, Instant};

/// Median wall time in ms of `f` over `reps` runs, after a warm-up of at least `warmup_runs`
/// runs and `warmup` of time. `f` must end with whatever makes its work finished (reading a
/// result back on CPU backends, a device synchronisation on GPUs).
pub fn median_ms(reps: usize, warmup_runs: usize, warmup: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut runs = 0;
    while runs < warmup_runs || start.elapsed() < warmup {
        f();
        runs += 1;
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

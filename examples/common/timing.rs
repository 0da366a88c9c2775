//! Wall-clock medians for the benchmark examples.

use std::time::{Duration, Instant};

/// Median wall time in ms of `f` over `reps` runs, after a warm-up of at least `warmup_runs`
/// runs and `warmup` of time. `f` must end with whatever makes its work finished (reading a
/// result back on CPU backends, a device synchronisation on GPUs).
pub fn median_ms(reps: usize, warmup_runs: usize, warmup: Duration, mut f: impl FnMut()) -> f64 {
    let rounds = rounds_ms(reps, warmup_runs, warmup, &mut [&mut f]);
    median(rounds.iter().map(|round| round[0]).collect())
}

/// Runs every function of `fs` once per round, in order, for `reps` rounds after a warm-up of
/// at least `warmup_runs` rounds and `warmup` of time; returns each round's times in ms.
/// Each function must end as [`median_ms`]'s does.
pub fn rounds_ms(
    reps: usize,
    warmup_runs: usize,
    warmup: Duration,
    fs: &mut [&mut dyn FnMut()],
) -> Vec<Vec<f64>> {
    let mut round = || -> Vec<f64> {
        fs.iter_mut()
            .map(|f| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect()
    };
    let start = Instant::now();
    let mut runs = 0;
    while runs < warmup_runs || start.elapsed() < warmup {
        round();
        runs += 1;
    }
    (0..reps.max(1)).map(|_| round()).collect()
}

/// The median of `x` (the upper one of an even count); `x` must not be empty.
pub fn median(mut x: Vec<f64>) -> f64 {
    x.sort_by(f64::total_cmp);
    x[x.len() / 2]
}

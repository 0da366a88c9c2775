//! Seeded, counter-based choice of random blocks (reproducible across runs and platforms).

/// SplitMix64 finaliser: a well-mixed 64-bit hash of `x`.
pub(crate) fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `count` distinct values of `0..limit` (all of them when `count >= limit`), sorted, a pure
/// function of `(seed, row)` (Floyd's sampling).
pub(crate) fn choose(seed: u64, row: usize, count: usize, limit: usize) -> Vec<usize> {
    if count >= limit {
        return (0..limit).collect();
    }
    let mut picked: Vec<usize> = Vec::with_capacity(count);
    let key = mix(seed ^ mix(row as u64));
    for (t, top) in (limit - count..limit).enumerate() {
        let r = (mix(key.wrapping_add(t as u64)) % (top as u64 + 1)) as usize;
        let value = if picked.contains(&r) { top } else { r };
        picked.push(value);
    }
    picked.sort_unstable();
    picked
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn choose_is_distinct_sorted_and_reproducible() {
        for row in 0..50 {
            let a = choose(7, row, 5, 40);
            assert_eq!(a.len(), 5);
            assert!(a.windows(2).all(|w| w[0] < w[1]));
            assert!(a.iter().all(|&x| x < 40));
            assert_eq!(a, choose(7, row, 5, 40));
        }
        assert_eq!(choose(1, 0, 9, 4), vec![0, 1, 2, 3]);
        assert_ne!(choose(1, 3, 5, 1000), choose(2, 3, 5, 1000));
    }
}

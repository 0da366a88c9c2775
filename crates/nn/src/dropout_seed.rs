//! Seeds of the layers' attention dropout.
//!
//! The kernels draw their dropout mask from a counter-based generator keyed by a seed; a
//! layer needs a fresh seed at every training forward. Seeds come from one sequence per
//! device (SplitMix64 over a counter, mixed with a key of the device), so that data-parallel
//! training draws a different mask on each replica and each replica's masks depend only on
//! the seed and its own call order, not on how the replicas' threads interleave; a run
//! repeats exactly after [`seed_attention_dropout`]. Drawing seeds on the host costs
//! nothing and, unlike reading a random tensor back, never waits for a GPU.
//!
//! Replicas that share one device (two workers on one CPU) share its sequence: their masks
//! still differ, but which replica draws which seed follows their threads' order.

use std::sync::Mutex;

use burn::tensor::Device;

/// The start of every device's counter until [`seed_attention_dropout`] is called.
const DEFAULT_SEED: u64 = 0x5eed_a77e_0000_0000;

/// The sequences' start and, per device, its key and the draws since.
struct Sequences {
    seed: u64,
    draws: Vec<(Device, u64, u64)>,
}

impl Sequences {
    /// Restarts every device's sequence at `seed`.
    fn reset(&mut self, seed: u64) {
        self.seed = seed;
        self.draws.clear();
    }

    /// The next seed of `device`'s sequence: the device's draw counter mixed with its key.
    /// Devices compare by hardware identity, so an autodiff device shares the sequence of
    /// the device it wraps.
    fn next(&mut self, device: &Device) -> u64 {
        let index = match self.draws.iter().position(|(d, _, _)| d == device) {
            Some(index) => index,
            None => {
                self.draws.push((device.clone(), device_key(device), 0));
                self.draws.len() - 1
            }
        };
        let (_, key, draw) = &mut self.draws[index];
        *draw += 1;
        mix(mix(self.seed.wrapping_add(*draw - 1)) ^ mix(*key))
    }
}

/// A key of `device` that depends only on which device it is (FNV-1a over the debug form
/// of the device without autodiff, which names its backend and index), not on when it
/// first drew: the order in which replicas' threads first draw must not change their masks.
fn device_key(device: &Device) -> u64 {
    format!("{:?}", device.clone().without_autodiff())
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

static SEQUENCES: Mutex<Sequences> = Mutex::new(Sequences {
    seed: DEFAULT_SEED,
    draws: Vec::new(),
});

/// Restarts every device's sequence of attention-dropout seeds at `seed`: the following
/// training forwards on each device draw the same masks as after any other call with the
/// same `seed`.
pub fn seed_attention_dropout(seed: u64) {
    SEQUENCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reset(seed);
}

/// SplitMix64's output function.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The next seed of `device`'s sequence.
pub(crate) fn next_dropout_seed(device: &Device) -> u64 {
    SEQUENCES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .next(device)
}

#[cfg(test)]
mod tests {
    // burn-ndarray is deprecated upstream (0.22) but is our default backend.
    #![allow(deprecated)]

    use super::*;

    /// The devices of this build: ndarray, and a second backend's device where one is
    /// compiled in (it stands for a second card).
    fn two_devices() -> [Device; 2] {
        #[cfg(feature = "flex")]
        let other = Device::flex();
        #[cfg(not(feature = "flex"))]
        let other = Device::ndarray().autodiff();
        [Device::ndarray(), other]
    }

    /// A device's sequence is reproducible from the seed whatever other devices drew in
    /// between, and differs from theirs; an autodiff device shares its inner device's.
    #[test]
    fn each_device_has_its_own_reproducible_sequence() {
        let [a, b] = two_devices();
        let mut sequences = Sequences {
            seed: 0,
            draws: Vec::new(),
        };
        sequences.reset(11);
        let alone: Vec<u64> = (0..4).map(|_| sequences.next(&a)).collect();
        sequences.reset(11);
        let mut interleaved = Vec::new();
        let mut others = Vec::new();
        for _ in 0..4 {
            interleaved.push(sequences.next(&a));
            others.push(sequences.next(&b));
        }
        if a == b {
            // One device: the draws interleave in one sequence.
            assert_eq!(interleaved[0], alone[0]);
            assert_eq!(others[0], alone[1]);
        } else {
            assert_eq!(
                interleaved, alone,
                "another device's draws leave this sequence alone"
            );
            assert!(others.iter().all(|s| !alone.contains(s)));
            // Nor does which device drew first.
            sequences.reset(11);
            let first_b = sequences.next(&b);
            assert_eq!(first_b, others[0]);
            let late: Vec<u64> = (0..4).map(|_| sequences.next(&a)).collect();
            assert_eq!(
                late, alone,
                "the order of first draws leaves the sequences alone"
            );
        }
        let mut sorted = alone.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), alone.len(), "every draw is a new seed");
        sequences.reset(12);
        assert_ne!(
            sequences.next(&a),
            alone[0],
            "another seed, another sequence"
        );
    }
}

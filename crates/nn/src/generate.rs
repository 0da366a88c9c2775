//! Generation with a [`SparseTransformer`]: the key/value caches of every block, cached
//! forward passes over new tokens, and seeded sampling.
//!
//! A prompt is run once (chunked prefill: every block appends its keys and values to its
//! cache), then each new token is one cached step: its attention reads only the cached keys
//! its pattern allows, so a token costs the same whatever the length of the text before it
//! (for window patterns), instead of a forward over the whole text.

use burn::config::Config;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sparse_attn_core::{Result, SparseAttentionError};

use crate::block::SparseTransformerBlock;
use crate::kv_cache::KvCache;
use crate::transformer::{Positions, SparseTransformer};

/// The key/value caches of every block of a [`SparseTransformer`].
#[derive(Debug, Clone)]
pub struct TransformerCache {
    layers: Vec<KvCache>,
}

impl TransformerCache {
    /// Tokens each batch row has seen (the position of its next token).
    pub fn lengths(&self) -> &[usize] {
        self.layers[0].lengths()
    }

    /// Slots of each batch row in every block's cache (see [`KvCache::capacity`]).
    pub fn capacity(&self) -> usize {
        self.layers[0].capacity()
    }

    /// Bytes of the cached keys and values of every block.
    pub fn memory_bytes(&self) -> usize {
        self.layers.iter().map(KvCache::memory_bytes).sum()
    }

    /// The cache of each block.
    pub fn layers(&self) -> &[KvCache] {
        &self.layers
    }

    /// Forgets every token (the memory stays allocated).
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(KvCache::clear);
    }
}

/// How [`SparseTransformer::generate`] picks tokens.
#[derive(Config, Debug)]
pub struct GenerateConfig {
    /// Tokens to generate after each prompt.
    pub max_new_tokens: usize,
    /// Softmax temperature of the sampling; 0 picks the most likely token (greedy).
    /// Default: 1.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Sample among the `k` most likely tokens only. Default: `None`, the whole vocabulary.
    #[config(default = "None")]
    pub top_k: Option<usize>,
    /// Seed of the sampling: the same seed gives the same tokens. Default: 0.
    #[config(default = 0)]
    pub seed: u64,
}

impl SparseTransformer {
    /// Empty key/value caches of every block for `batch` sequences of up to `capacity`
    /// tokens.
    ///
    /// # Errors
    /// `batch` or `capacity` zero, `capacity` above `max_seq_len`, or a block with Burn's
    /// dense attention.
    pub fn new_cache(
        &self,
        batch: usize,
        capacity: usize,
        device: &Device,
    ) -> Result<TransformerCache> {
        if capacity > self.max_seq_len {
            return Err(SparseAttentionError::SequenceTooLong {
                len: capacity,
                max: self.max_seq_len,
            });
        }
        self.caches(|block| block.new_cache(batch, capacity, device))
    }

    /// Bounded key/value caches of every block for `batch` sequences of any length, for
    /// window patterns (see [`MultiHeadSparseAttention::new_window_cache`]): each keeps only
    /// the tokens a later query can read. The length of a text is then bounded only by the
    /// position encoding (`max_seq_len` positions). `chunk` is the most tokens one call
    /// adds.
    ///
    /// # Errors
    /// `batch` or `chunk` zero, a block whose pattern has no stream window, or a block with
    /// Burn's dense attention.
    ///
    /// [`MultiHeadSparseAttention::new_window_cache`]: crate::MultiHeadSparseAttention::new_window_cache
    pub fn new_window_cache(
        &self,
        batch: usize,
        chunk: usize,
        device: &Device,
    ) -> Result<TransformerCache> {
        self.caches(|block| block.new_window_cache(batch, chunk, device))
    }

    /// A cache of every block, each made by `make`.
    fn caches(
        &self,
        make: impl Fn(&SparseTransformerBlock) -> Result<KvCache>,
    ) -> Result<TransformerCache> {
        let layers = self.blocks.iter().map(make).collect::<Result<Vec<_>>>()?;
        Ok(TransformerCache { layers })
    }

    /// Next-token logits of new tokens that follow the tokens in `cache`, appending them to
    /// every block's cache: for a causal pattern the same, to rounding, as
    /// [`forward`](Self::forward) over the whole text at these positions.
    ///
    /// # Shapes
    /// `tokens`: `[batch, m]` -> `[batch, m, vocab_size]`.
    ///
    /// # Errors
    /// A cache of another model or batch, more tokens than the cache holds.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use sparse_attn_nn::{PatternConfig, SparseTransformerConfig};
    ///
    /// let device = Device::ndarray();
    /// let model = SparseTransformerConfig::new(256, 32, 4, 2, 64, PatternConfig::Local { ctx: 16 })
    ///     .with_block_size(16)
    ///     .init(&device)?;
    /// let text = Tensor::<2, Int>::from_ints([[72, 101, 108, 108, 111, 33]], &device);
    /// let full = model.forward(text.clone())?;
    /// let mut cache = model.new_cache(1, 64, &device)?;
    /// let prefix = model.forward_cached(text.clone().slice([0..1, 0..5]), &mut cache)?;
    /// let last = model.forward_cached(text.slice([0..1, 5..6]), &mut cache)?;
    /// let diff = (last - full.slice([0..1, 5..6, 0..256])).abs().max().into_scalar::<f32>();
    /// assert!(diff < 1e-4, "{diff}");
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn forward_cached(
        &self,
        tokens: Tensor<2, Int>,
        cache: &mut TransformerCache,
    ) -> Result<Tensor<3>> {
        let [batch, m] = tokens.dims();
        self.forward_cached_lengths(tokens, &vec![m; batch], cache)
    }

    /// [`forward_cached`](Self::forward_cached) for batch rows that add different numbers of
    /// tokens: row `b` adds its first `valid[b]` tokens (the rest is padding; its logits
    /// mean nothing).
    ///
    /// # Errors
    /// As [`forward_cached`](Self::forward_cached), and `valid` not one per row or above
    /// `m`.
    pub fn forward_cached_lengths(
        &self,
        tokens: Tensor<2, Int>,
        valid: &[usize],
        cache: &mut TransformerCache,
    ) -> Result<Tensor<3>> {
        let [batch, m] = tokens.dims();
        if batch == 0 || m == 0 {
            let name = if batch == 0 { "batch" } else { "tokens" };
            return Err(SparseAttentionError::Zero { name });
        }
        if cache.layers.len() != self.blocks.len() {
            return Err(SparseAttentionError::CacheMismatch {
                what: "blocks",
                cache: cache.layers.len().to_string(),
                layer: self.blocks.len().to_string(),
            });
        }
        // Positions of the new rows; padding rows repeat a valid one (their output is
        // ignored).
        let first = cache.lengths().to_vec();
        if first.len() != batch {
            return Err(SparseAttentionError::CacheMismatch {
                what: "batch",
                cache: first.len().to_string(),
                layer: batch.to_string(),
            });
        }
        if let Some(end) = first
            .iter()
            .zip(valid)
            .map(|(&f, &n)| f.saturating_add(n))
            .find(|&end| end > self.max_seq_len)
        {
            return Err(SparseAttentionError::SequenceTooLong {
                len: end,
                max: self.max_seq_len,
            });
        }
        let last = self.max_seq_len - 1;
        let positions: Vec<i64> = first
            .iter()
            .flat_map(|&f| (0..m).map(move |i| (f + i).min(last) as i64))
            .collect();
        let device = tokens.device();
        let index = Tensor::<2, Int>::from_data(TensorData::new(positions, [batch, m]), &device);
        let mut x = self.tokens.forward(tokens);
        x = match &self.positions {
            None => x,
            Some(Positions::Learned(embedding)) => x + embedding.forward(index),
            Some(Positions::Sinusoidal(encoding)) => {
                let d = encoding.sinusoids.dims()[2];
                let rows = encoding
                    .sinusoids
                    .clone()
                    .select(1, index.reshape([batch * m]));
                x + rows.reshape([batch, m, d])
            }
        };
        for (block, layer) in self.blocks.iter().zip(&mut cache.layers) {
            x = block.forward_cached(x, valid, layer)?;
        }
        Ok(self.head.forward(self.norm.forward(x)))
    }

    /// Generates `config.max_new_tokens` tokens after each of `prompts` (of any lengths,
    /// decoded together as one batch): one cached prefill, then one cached step per token,
    /// through window caches ([`new_window_cache`](Self::new_window_cache)) when the
    /// pattern has a stream window and they are smaller than the text.
    /// Returns the new tokens of each prompt. Run it on a model without autodiff (or
    /// `model.valid()`) so that dropout is off.
    ///
    /// # Errors
    /// No prompt or an empty one, a prompt plus its new tokens longer than `max_seq_len`,
    /// a token outside the vocabulary, a model with Burn's dense attention blocks.
    ///
    /// # Example
    /// ```
    /// use burn::tensor::Device;
    /// use sparse_attn_nn::{GenerateConfig, PatternConfig, SparseTransformerConfig};
    ///
    /// let device = Device::ndarray();
    /// let model = SparseTransformerConfig::new(256, 32, 4, 2, 64, PatternConfig::Local { ctx: 16 })
    ///     .with_block_size(16)
    ///     .init(&device)?;
    /// let config = GenerateConfig::new(8).with_temperature(0.8).with_top_k(Some(20)).with_seed(7);
    /// let out = model.generate(&[b"Hello".map(u32::from).to_vec(), vec![10]], &config, &device)?;
    /// assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), [8, 8]);
    /// assert_eq!(out, model.generate(&[b"Hello".map(u32::from).to_vec(), vec![10]], &config, &device)?);
    /// # Ok::<(), sparse_attn_core::SparseAttentionError>(())
    /// ```
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        device: &Device,
    ) -> Result<Vec<Vec<u32>>> {
        self.generate_with(prompts, config, device, |_| {})
    }

    /// [`generate`](Self::generate), calling `on_step` with each step's new token of every
    /// prompt as soon as it is drawn (for progress lines or streaming output).
    ///
    /// # Errors
    /// As [`generate`](Self::generate).
    pub fn generate_with(
        &self,
        prompts: &[Vec<u32>],
        config: &GenerateConfig,
        device: &Device,
        mut on_step: impl FnMut(&[u32]),
    ) -> Result<Vec<Vec<u32>>> {
        let vocab = self.head.weight.dims()[1];
        if prompts.is_empty() {
            return Err(SparseAttentionError::Zero { name: "prompts" });
        }
        if prompts.iter().any(Vec::is_empty) {
            return Err(SparseAttentionError::Zero { name: "prompt" });
        }
        if let Some(&token) = prompts.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(SparseAttentionError::OutOfRange {
                what: "prompt token",
                got: token as usize,
                len: vocab,
            });
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let capacity = longest + config.max_new_tokens;
        if capacity > self.max_seq_len {
            return Err(SparseAttentionError::SequenceTooLong {
                len: capacity,
                max: self.max_seq_len,
            });
        }
        let batch = prompts.len();
        let mut out = vec![Vec::with_capacity(config.max_new_tokens); batch];
        if config.max_new_tokens == 0 {
            return Ok(out);
        }
        // A window pattern's caches keep only what later queries read, when that is less
        // than the whole text (the result is the same either way).
        let window_slots = self.blocks.iter().try_fold(0, |most: usize, block| {
            let (_, slots) = block.cached_attention()?.window_slots(longest)?;
            Ok::<_, SparseAttentionError>(most.max(slots))
        });
        let mut cache = match window_slots {
            Ok(slots) if slots < capacity => self.new_window_cache(batch, longest, device)?,
            _ => self.new_cache(batch, capacity, device)?,
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        // Prefill: every prompt right-padded to the longest; the logits of each prompt's last
        // token pick its first new token.
        let padded: Vec<i64> = prompts
            .iter()
            .flat_map(|p| (0..longest).map(move |i| p.get(i).copied().unwrap_or(0) as i64))
            .collect();
        let tokens = Tensor::<2, Int>::from_data(TensorData::new(padded, [batch, longest]), device);
        let valid: Vec<usize> = prompts.iter().map(Vec::len).collect();
        let logits = self.forward_cached_lengths(tokens, &valid, &mut cache)?;
        let last: Vec<Tensor<3>> = (0..batch)
            .map(|b| {
                let at = valid[b] - 1;
                logits.clone().slice([b..b + 1, at..at + 1, 0..vocab])
            })
            .collect();
        let mut next = sample_rows(Tensor::cat(last, 0), config, &mut rng)?;
        for step in 0..config.max_new_tokens {
            for (row, &token) in out.iter_mut().zip(&next) {
                row.push(token);
            }
            on_step(&next);
            if step + 1 == config.max_new_tokens {
                break;
            }
            let ids: Vec<i64> = next.iter().map(|&t| i64::from(t)).collect();
            let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [batch, 1]), device);
            let logits = self.forward_cached(tokens, &mut cache)?;
            next = sample_rows(logits, config, &mut rng)?;
        }
        Ok(out)
    }
}

/// One token per row of `logits` (`[batch, 1, vocab]`), by `config`'s rule.
fn sample_rows(logits: Tensor<3>, config: &GenerateConfig, rng: &mut StdRng) -> Result<Vec<u32>> {
    let [batch, _, vocab] = logits.dims();
    let values = logits
        .reshape([batch, vocab])
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| SparseAttentionError::DType {
            got: format!("{e:?}"),
            expected: "logits readable as f32",
        })?;
    Ok(values
        .chunks(vocab)
        .map(|row| sample(row, config, rng))
        .collect())
}

/// A token drawn from `logits` with `config`'s temperature and top-k (greedy at
/// temperature 0; NaN logits never win).
fn sample(logits: &[f32], config: &GenerateConfig, rng: &mut StdRng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| !logits[i].is_nan()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = config.top_k {
        order.truncate(k.max(1));
    }
    let Some(&best) = order.first() else {
        return 0;
    };
    if config.temperature <= 0.0 {
        return best as u32;
    }
    let inv_t = 1.0 / config.temperature;
    let top = f64::from(logits[best]);
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((f64::from(logits[i]) - top) * inv_t).exp())
        .collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (&i, &w) in order.iter().zip(&weights) {
        u -= w;
        if u <= 0.0 {
            return i as u32;
        }
    }
    *order.last().unwrap_or(&best) as u32
}

#[cfg(test)]
mod tests {
    // burn-ndarray is deprecated upstream (0.22) but is our default backend.
    #![allow(deprecated)]

    use burn::tensor::Distribution;

    use super::*;
    use crate::{PatternConfig, PositionEncoding, SparseTransformerConfig};

    fn model(
        pattern: PatternConfig,
        positions: PositionEncoding,
        device: &Device,
    ) -> SparseTransformer {
        SparseTransformerConfig::new(64, 16, 4, 2, 48, pattern)
            .with_block_size(4)
            .with_positions(positions)
            .init(device)
            .unwrap()
    }

    fn text(batch: usize, n: usize, device: &Device) -> Tensor<2, Int> {
        Tensor::<2>::random([batch, n], Distribution::Uniform(0.0, 63.0), device).int()
    }

    fn max_diff(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    /// A prefill, single tokens and chunks through the caches give the full forward's
    /// logits at every position: causal patterns, a permuted layout, per-head patterns,
    /// globals and random blocks (drawn for the capacity, which here is the text's length),
    /// both position encodings, a text that is not a multiple of the block.
    #[test]
    fn cached_steps_equal_the_full_forward() {
        let device = Device::ndarray();
        let patterns = [
            PatternConfig::Local { ctx: 6 },
            PatternConfig::Strided { stride: 3 },
            PatternConfig::PaperStrided { ctx: 4 },
            PatternConfig::Fixed {
                local_ctx: 8,
                num_verts: 2,
                vertsize: 1,
            },
            PatternConfig::BigBird {
                window: 5,
                globals: vec![0],
                random_blocks: 1,
                random_block: 4,
                seed: 3,
                causal: true,
            },
            PatternConfig::Streaming {
                sinks: 2,
                window: 5,
            },
            PatternConfig::PerHead(vec![
                PatternConfig::Local { ctx: 3 },
                PatternConfig::Strided { stride: 4 },
                PatternConfig::All,
                PatternConfig::SlidingWindow { window: 7 },
            ]),
        ];
        let n = 23;
        for pattern in patterns {
            for positions in [PositionEncoding::Learned, PositionEncoding::Sinusoidal] {
                let what = format!("{pattern:?} {positions:?}");
                let model = model(pattern.clone(), positions, &device);
                let tokens = text(2, n, &device);
                let full = model.forward(tokens.clone()).unwrap();
                let mut cache = model.new_cache(2, n, &device).unwrap();
                let mut parts = Vec::new();
                for (start, end) in [(0, 9), (9, 10), (10, 13), (13, 14), (14, 23)] {
                    let chunk = tokens.clone().slice([0..2, start..end]);
                    parts.push(model.forward_cached(chunk, &mut cache).unwrap());
                }
                assert_eq!(cache.lengths(), &[n, n]);
                let diff = max_diff(Tensor::cat(parts, 1), full);
                assert!(diff < 1e-4, "{what}: {diff}");
            }
        }
    }

    /// A cache larger than the text: for patterns that do not depend on the length, the
    /// steps equal the full forward of the text itself.
    #[test]
    fn a_larger_cache_gives_the_same_rows() {
        let device = Device::ndarray();
        for pattern in [
            PatternConfig::Local { ctx: 5 },
            PatternConfig::Strided { stride: 3 },
        ] {
            let model = model(pattern.clone(), PositionEncoding::Learned, &device);
            let tokens = text(1, 17, &device);
            let full = model.forward(tokens.clone()).unwrap();
            let mut cache = model.new_cache(1, 48, &device).unwrap();
            let first = model
                .forward_cached(tokens.clone().slice([0..1, 0..11]), &mut cache)
                .unwrap();
            let rest = (11..17)
                .map(|t| {
                    model
                        .forward_cached(tokens.clone().slice([0..1, t..t + 1]), &mut cache)
                        .unwrap()
                })
                .collect::<Vec<_>>();
            let cached = Tensor::cat([vec![first], rest].concat(), 1);
            let diff = max_diff(cached, full);
            assert!(diff < 1e-4, "{pattern:?}: {diff}");
        }
    }

    /// Rows of different lengths decode together: each row's logits are those of its own
    /// text alone.
    #[test]
    fn rows_of_different_lengths_decode_in_one_batch() {
        let device = Device::ndarray();
        let model = model(
            PatternConfig::Local { ctx: 6 },
            PositionEncoding::Learned,
            &device,
        );
        let tokens = text(2, 12, &device);
        let mut cache = model.new_cache(2, 16, &device).unwrap();
        // Row 0 has 7 tokens of prompt, row 1 has 3; then both take four single steps.
        let prefill = model
            .forward_cached_lengths(tokens.clone().slice([0..2, 0..7]), &[7, 3], &mut cache)
            .unwrap();
        assert_eq!(cache.lengths(), &[7, 3]);
        let mut steps = Vec::new();
        for s in 0..4 {
            let next = Tensor::cat(
                vec![
                    tokens.clone().slice([0..1, 7 + s..8 + s]),
                    tokens.clone().slice([1..2, 3 + s..4 + s]),
                ],
                0,
            );
            steps.push(model.forward_cached(next, &mut cache).unwrap());
        }
        let steps = Tensor::cat(steps, 1);
        for (row, len) in [(0usize, 7usize), (1, 3)] {
            let own = tokens.clone().slice([row..row + 1, 0..len]);
            let own = Tensor::cat(
                vec![own, tokens.clone().slice([row..row + 1, len..len + 4])],
                1,
            );
            let full = model.forward(own).unwrap();
            let got = Tensor::cat(
                vec![
                    prefill.clone().slice([row..row + 1, 0..len, 0..64]),
                    steps.clone().slice([row..row + 1, 0..4, 0..64]),
                ],
                1,
            );
            let diff = max_diff(got, full);
            assert!(diff < 1e-4, "row {row}: {diff}");
        }
    }

    /// Window caches far smaller than the text (their rows move behind the sinks several
    /// times) give the full forward's logits at every position: window patterns with and
    /// without sinks, a dilated window, per-head windows, prefill chunks and single steps,
    /// and batch rows of different lengths that move at different steps.
    #[test]
    fn window_caches_past_their_slots_equal_the_full_forward() {
        let device = Device::ndarray();
        let patterns = [
            PatternConfig::Local { ctx: 5 },
            PatternConfig::SlidingWindow { window: 3 },
            PatternConfig::Streaming {
                sinks: 3,
                window: 4,
            },
            PatternConfig::Dilated {
                window: 3,
                dilation: 2,
                causal: true,
            },
            PatternConfig::PerHead(vec![
                PatternConfig::Local { ctx: 3 },
                PatternConfig::Streaming {
                    sinks: 2,
                    window: 6,
                },
                PatternConfig::SlidingWindow { window: 2 },
                PatternConfig::Local { ctx: 7 },
            ]),
        ];
        let n = 45;
        for pattern in patterns {
            let model = model(pattern.clone(), PositionEncoding::Learned, &device);
            let tokens = text(2, n, &device);
            let ids = tokens
                .to_data()
                .convert::<i64>()
                .try_into_vec::<i64>()
                .unwrap();
            let mut cache = model.new_window_cache(2, 4, &device).unwrap();
            assert!(cache.capacity() < 20, "{pattern:?}: {}", cache.capacity());
            // Row 1 lags row 0 by three tokens: their rows move at different steps.
            let lag = 3;
            let mut got = [Vec::new(), Vec::new()];
            let mut at = [0usize, 0];
            for step in [
                4, 1, 3, 1, 1, 2, 4, 1, 1, 1, 4, 3, 1, 1, 4, 1, 1, 2, 4, 1, 4,
            ] {
                let valid = [step.min(n - at[0]), step.min(n - lag - at[1])];
                // Each row's next tokens, right-padded to the call's four columns.
                let ids: Vec<i64> = (0..2)
                    .flat_map(|b| (0..4).map(move |i| (b, at[b] + i)))
                    .map(|(b, t)| ids[b * n + t.min(n - 1)])
                    .collect();
                let chunk = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 4]), &device);
                let logits = model
                    .forward_cached_lengths(chunk, &valid, &mut cache)
                    .unwrap();
                for b in 0..2 {
                    got[b].push(logits.clone().slice([b..b + 1, 0..valid[b], 0..64]));
                    at[b] += valid[b];
                }
            }
            assert_eq!(at, [n, n - lag], "{pattern:?}");
            assert_eq!(cache.lengths(), &at);
            for b in 0..2 {
                let full = model
                    .forward(tokens.clone().slice([b..b + 1, 0..at[b]]))
                    .unwrap();
                let diff = max_diff(Tensor::cat(std::mem::take(&mut got[b]), 1), full);
                assert!(diff < 1e-4, "{pattern:?} row {b}: {diff}");
            }
        }
    }

    /// With soft-capping and ALiBi (and no position embedding), cached steps through a full
    /// cache and through a window cache smaller than the text equal the full forward; a
    /// window cache with ALiBi for a pattern with sinks is refused (the sinks' distances
    /// grow with the text).
    #[test]
    fn modified_scores_decode_as_the_full_forward() {
        let device = Device::ndarray();
        let modified = |pattern: PatternConfig| {
            let relative = crate::RelativeBiasConfig::new()
                .with_buckets(8)
                .with_max_distance(12);
            let mut model = SparseTransformerConfig::new(64, 16, 4, 2, 48, pattern)
                .with_block_size(4)
                .with_positions(PositionEncoding::None)
                .with_softcap(Some(2.0))
                .with_alibi(true)
                .with_relative_bias(Some(relative))
                .init(&device)
                .unwrap();
            // Tables that are not a fresh model's zeros.
            for block in &mut model.blocks {
                if let crate::SelfAttention::Sparse(layer) = &mut block.attention {
                    let table = Tensor::<2>::random(
                        [4, 8],
                        burn::tensor::Distribution::Normal(0.0, 1.0),
                        &device,
                    );
                    layer.relative_bias = Some(burn::module::Param::from_tensor(table));
                }
            }
            model
        };
        let n = 29;
        for (pattern, window) in [
            (PatternConfig::Local { ctx: 5 }, true),
            (PatternConfig::SlidingWindow { window: 3 }, true),
            (PatternConfig::Strided { stride: 3 }, false),
        ] {
            let model = modified(pattern.clone());
            let tokens = text(1, n, &device);
            let full = model.forward(tokens.clone()).unwrap();
            let mut caches = vec![model.new_cache(1, n, &device).unwrap()];
            if window {
                let cache = model.new_window_cache(1, 3, &device).unwrap();
                assert!(cache.capacity() < 15, "{pattern:?}: {}", cache.capacity());
                caches.push(cache);
            }
            for mut cache in caches {
                let mut parts = Vec::new();
                for (start, end) in [(0, 3), (3, 4), (4, 7), (7, 8), (8, 11), (11, 14)]
                    .into_iter()
                    .chain((14..n).map(|t| (t, t + 1)))
                {
                    let chunk = tokens.clone().slice([0..1, start..end]);
                    parts.push(model.forward_cached(chunk, &mut cache).unwrap());
                }
                let diff = max_diff(Tensor::cat(parts, 1), full.clone());
                assert!(
                    diff < 1e-4,
                    "{pattern:?} capacity {}: {diff}",
                    cache.capacity()
                );
            }
        }
        let sinks = modified(PatternConfig::Streaming {
            sinks: 2,
            window: 4,
        });
        assert!(matches!(
            sinks.new_window_cache(1, 3, &device),
            Err(SparseAttentionError::Unsupported { .. })
        ));
    }

    /// Greedy generation picks, at every step, the most likely token of the full forward
    /// over the text so far (here through window caches smaller than the text).
    #[test]
    fn greedy_generation_follows_the_full_forward() {
        let device = Device::ndarray();
        let model = model(
            PatternConfig::Local { ctx: 6 },
            PositionEncoding::Learned,
            &device,
        );
        let prompt = vec![5u32, 9, 1, 33, 2];
        // 35 tokens through window caches of 11 slots: their rows move three times.
        let config = GenerateConfig::new(30).with_temperature(0.0);
        let new = model
            .generate(std::slice::from_ref(&prompt), &config, &device)
            .unwrap();
        let mut text = prompt.clone();
        for &token in &new[0] {
            let ids: Vec<i64> = text.iter().map(|&t| i64::from(t)).collect();
            let n = ids.len();
            let logits = model
                .forward(Tensor::from_data(TensorData::new(ids, [1, n]), &device))
                .unwrap()
                .slice([0..1, n - 1..n, 0..64])
                .reshape([64]);
            let best = logits.argmax(0).into_scalar::<i64>();
            assert_eq!(i64::from(token), best, "after {text:?}");
            text.push(token);
        }
    }

    #[test]
    fn bad_caches_and_prompts_are_typed_errors() {
        let device = Device::ndarray();
        let model = model(
            PatternConfig::Local { ctx: 6 },
            PositionEncoding::Learned,
            &device,
        );
        let mut cache = model.new_cache(1, 8, &device).unwrap();
        assert!(matches!(
            model.forward_cached(text(1, 9, &device), &mut cache),
            Err(SparseAttentionError::CacheFull {
                end: 9,
                capacity: 8,
                ..
            })
        ));
        assert!(matches!(
            model.forward_cached(text(2, 1, &device), &mut cache),
            Err(SparseAttentionError::CacheMismatch { what: "batch", .. })
        ));
        assert!(matches!(
            model.new_cache(1, 49, &device),
            Err(SparseAttentionError::SequenceTooLong { len: 49, max: 48 })
        ));
        let other = SparseTransformerConfig::new(64, 16, 2, 3, 48, PatternConfig::Local { ctx: 6 })
            .with_block_size(4)
            .init(&device)
            .unwrap();
        let mut wrong = other.new_cache(1, 8, &device).unwrap();
        assert!(matches!(
            model.forward_cached(text(1, 2, &device), &mut wrong),
            Err(SparseAttentionError::CacheMismatch { .. })
        ));
        let dense = SparseTransformerConfig::new(64, 16, 2, 1, 48, PatternConfig::All)
            .with_dense(true)
            .init(&device)
            .unwrap();
        assert!(matches!(
            dense.new_cache(1, 8, &device),
            Err(SparseAttentionError::Unsupported { .. })
        ));
        // Burn's dense attention has no score modifiers: refused, not ignored.
        for (softcap, alibi) in [(Some(5.0), false), (None, true)] {
            let refused = SparseTransformerConfig::new(64, 16, 2, 1, 48, PatternConfig::All)
                .with_dense(true)
                .with_softcap(softcap)
                .with_alibi(alibi)
                .init(&device);
            assert!(matches!(
                refused,
                Err(SparseAttentionError::Unsupported { .. })
            ));
        }
        for pattern in [
            PatternConfig::All,
            PatternConfig::Strided { stride: 4 },
            PatternConfig::Fixed {
                local_ctx: 8,
                num_verts: 1,
                vertsize: 1,
            },
        ] {
            let model = SparseTransformerConfig::new(64, 16, 2, 1, 48, pattern)
                .with_block_size(4)
                .init(&device)
                .unwrap();
            assert!(matches!(
                model.new_window_cache(1, 4, &device),
                Err(SparseAttentionError::Unsupported { .. })
            ));
        }
        let mut window = model.new_window_cache(1, 2, &device).unwrap();
        assert_eq!(window.capacity(), 5 + 6);
        assert!(matches!(
            model.new_window_cache(1, 0, &device),
            Err(SparseAttentionError::Zero { name: "chunk" })
        ));
        // More tokens than the room behind the window, then past the positions.
        assert!(matches!(
            model.forward_cached(text(1, 12, &device), &mut window),
            Err(SparseAttentionError::CacheFull { .. })
        ));
        for _ in 0..8 {
            model
                .forward_cached(text(1, 6, &device), &mut window)
                .unwrap();
        }
        assert!(matches!(
            model.forward_cached(text(1, 1, &device), &mut window),
            Err(SparseAttentionError::SequenceTooLong { len: 49, max: 48 })
        ));
        let config = GenerateConfig::new(4);
        for (prompts, want) in [(vec![], "prompts"), (vec![vec![]], "prompt")] {
            assert!(matches!(
                model.generate(&prompts, &config, &device),
                Err(SparseAttentionError::Zero { name }) if name == want
            ));
        }
        assert!(matches!(
            model.generate(&[vec![64]], &config, &device),
            Err(SparseAttentionError::OutOfRange {
                got: 64,
                len: 64,
                ..
            })
        ));
        assert!(matches!(
            model.generate(&[vec![1; 45]], &config, &device),
            Err(SparseAttentionError::SequenceTooLong { len: 49, max: 48 })
        ));
    }
}

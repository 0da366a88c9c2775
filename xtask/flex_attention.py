"""PyTorch FlexAttention on the masks that `bench_gpu` measures.

Run on the GPU that runs `bench_gpu`, before it; pass the JSON to `bench_gpu --flex FILE`:

    python3 xtask/flex_attention.py --patterns window,strided,fixed,bigbird --out flex.json

Same problems as ours (B=1, H heads, head dim d, token predicates in natural order):
- window: key j allowed for query i iff 0 <= i - j < window;
- strided: j <= i and (i - j) % stride == 0;
- fixed: j <= i and (i // l == j // l or j % l >= l - c), l = 2 * window, c = window // 8
  (`Fixed::new(l, 1, c)`);
- bigbird: j <= i and (0 <= i - j < window or i == 0 or j == 0 or block j // 128 is one of
  the 2 random blocks of block i // 128), the random blocks drawn exactly as
  `sparse_attn_core::pattern::BigBird` draws them (SplitMix64, Floyd's sampling, seed 7).

Timings are medians of CUDA-event-timed runs after warm-up (compilation excluded); fwd+bwd
is `out.backward(g)` after the forward, as in `bench_gpu`. A configuration FlexAttention
cannot run (say, a block size its kernels do not lower for that head dim and dtype) is
written with its reason instead of times.
"""

import argparse
import json
import statistics

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

MASK64 = (1 << 64) - 1
# Largest n at which `block_mask` is checked against `create_block_mask`.
CHECKED_N = 8192


def mix(x):
    """SplitMix64 finaliser, as `pattern::random::mix`."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def choose(seed, row, count, limit):
    """`count` distinct values of `0..limit`, as `pattern::random::choose`."""
    if count >= limit:
        return list(range(limit))
    picked = []
    key = mix(seed ^ mix(row))
    for t, top in enumerate(range(limit - count, limit)):
        r = mix((key + t) & MASK64) % (top + 1)
        picked.append(top if r in picked else r)
    return sorted(picked)


def median_ms(fn, reps):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def mask_mod(pattern, n, args):
    window, stride = args.window, args.stride
    if pattern == "window":
        return lambda b, h, q, kv: (q >= kv) & (q - kv < window)
    if pattern == "strided":
        return lambda b, h, q, kv: (q >= kv) & ((q - kv) % stride == 0)
    if pattern == "fixed":
        l, c = 2 * window, max(window // 8, 1)
        return lambda b, h, q, kv: (q >= kv) & ((q // l == kv // l) | (kv % l >= l - c))
    if pattern == "bigbird":
        rb = 128
        nb = -(-n // rb)
        table = torch.zeros(nb, nb, dtype=torch.bool)
        for qb in range(nb):
            for kb in choose(7, qb, 2, qb + 1):
                table[qb, kb] = True
        table = table.cuda()

        def bigbird(b, h, q, kv):
            near = (q - kv < window) | (q == 0) | (kv == 0) | table[q // rb, kv // rb]
            return (q >= kv) & near

        return bigbird
    raise SystemExit(f"unknown pattern {pattern}: expected window, strided, fixed or bigbird")


def block_mask(mod, n, block, rows_per_chunk=2048):
    """FlexAttention's `BlockMask` for `mod`, built a chunk of query rows at a time.

    `create_block_mask` evaluates the mask over all n x n positions unless its compiled
    path takes the predicate, and for the fixed and BigBird predicates it did not (it asked
    for 1 TiB at n = 131072). Here the predicate runs on `rows_per_chunk x n` positions at
    a time; blocks where it holds everywhere become FlexAttention's full blocks (no mask
    applied), blocks where it holds somewhere its partial blocks (`mod` applied per element).
    """
    nb = -(-n // block)
    rows_per_chunk = max(block, rows_per_chunk // block * block)
    partial, full = [], []
    kv = torch.arange(nb * block, device="cuda")[None, :]
    zero = torch.zeros((), dtype=torch.int64, device="cuda")
    for start in range(0, nb * block, rows_per_chunk):
        q = torch.arange(start, min(start + rows_per_chunk, nb * block), device="cuda")[:, None]
        allowed = mod(zero, zero, q, kv) & (q < n) & (kv < n)
        tiles = allowed.reshape(q.shape[0] // block, block, nb, block)
        some, every = tiles.any(dim=(1, 3)), tiles.all(dim=(1, 3))
        partial.append(some & ~every)
        full.append(every)

    def lists(table):
        # Active block indices first, in increasing order (a stable sort on "inactive").
        order = torch.sort((~table).to(torch.int8), dim=1, stable=True).indices
        return (table.sum(dim=1).to(torch.int32)[None, None],
                order.to(torch.int32)[None, None])

    kv_num, kv_idx = lists(torch.cat(partial))
    full_num, full_idx = lists(torch.cat(full))
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block,
                                    mask_mod=mod, seq_lengths=(n, n))
    if n <= CHECKED_N:
        # Where FlexAttention's own builder fits, the two must agree block for block.
        theirs = create_block_mask(mod, None, None, n, n, device="cuda", BLOCK_SIZE=block)
        for ours, ref in [(mask.kv_num_blocks, theirs.kv_num_blocks),
                          (mask.full_kv_num_blocks, theirs.full_kv_num_blocks)]:
            if not torch.equal(ours.flatten(), ref.flatten()):
                raise RuntimeError("chunked block mask differs from create_block_mask")
    return mask


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--patterns", default="window")
    parser.add_argument("--n", default="8192,32768,131072")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--blocks", default="128")
    parser.add_argument("--dtypes", default="f32,f16,bf16")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="target/bench/flex.json")
    args = parser.parse_args()

    compiled = torch.compile(flex_attention)
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for pattern in args.patterns.split(","):
        for name in args.dtypes.split(","):
            for block in [int(x) for x in args.blocks.split(",")]:
                for n in [int(x) for x in args.n.split(",")]:
                    row = {"impl": "flex_attention", "pattern": pattern, "dtype": name, "n": n,
                           "block": block, "heads": args.heads, "head_dim": args.head_dim}
                    try:
                        mask = block_mask(mask_mod(pattern, n, args), n, block)
                        shape = (1, args.heads, n, args.head_dim)

                        def x(grad=False):
                            return torch.randn(shape, device="cuda", dtype=dtypes[name],
                                               requires_grad=grad)

                        q, k, v = x(), x(), x()
                        row["fwd_ms"] = median_ms(lambda: compiled(q, k, v, block_mask=mask),
                                                  args.reps)
                        qa, ka, va, g = x(True), x(True), x(True), x()

                        def fwd_bwd():
                            compiled(qa, ka, va, block_mask=mask).backward(g)

                        row["fwd_bwd_ms"] = median_ms(fwd_bwd, args.reps)
                    except Exception as e:  # noqa: BLE001 - every failure is reported
                        row["failed"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                        torch.cuda.empty_cache()
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

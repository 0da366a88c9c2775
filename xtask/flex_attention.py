"""PyTorch FlexAttention on the causal sliding window that `bench_gpu` measures.

Run on the GPU that runs `bench_gpu`, before it; pass the JSON to `bench_gpu --flex FILE`:

    python3 xtask/flex_attention.py --out target/bench/flex.json

Same problem as ours: B=1, H=16, d=64, key j allowed for query i iff 0 <= i - j < window.
Timings are medians of CUDA-event-timed runs after warm-up (compilation excluded);
fwd+bwd is `out.backward(g)` after the forward, as in `bench_gpu`.
"""

import argparse
import json
import statistics

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", default="8192,32768,131072")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--dtypes", default="f32,f16,bf16")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--out", default="target/bench/flex.json")
    args = parser.parse_args()

    window = args.window

    def sliding_window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    compiled = torch.compile(flex_attention)
    dtypes = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
    rows = []
    for name in args.dtypes.split(","):
        for n in [int(x) for x in args.n.split(",")]:
            # `_compile=True` builds the block mask without materialising an n x n mask.
            mask = create_block_mask(
                sliding_window,
                None,
                None,
                n,
                n,
                device="cuda",
                BLOCK_SIZE=args.block,
                _compile=True,
            )
            shape = (1, args.heads, n, args.head_dim)

            def x(grad=False):
                return torch.randn(shape, device="cuda", dtype=dtypes[name], requires_grad=grad)

            q, k, v = x(), x(), x()
            fwd = median_ms(lambda: compiled(q, k, v, block_mask=mask), args.reps)
            qa, ka, va, g = x(True), x(True), x(True), x()

            def fwd_bwd():
                compiled(qa, ka, va, block_mask=mask).backward(g)

            both = median_ms(fwd_bwd, args.reps)
            row = {"impl": "flex_attention", "dtype": name, "n": n, "fwd_ms": fwd, "fwd_bwd_ms": both}
            print(json.dumps(row), flush=True)
            rows.append(row)
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

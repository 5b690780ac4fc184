"""What chunk-invariant batch-invariant attention costs on the GPU (issue 20, session 5): the
8B attention shape (Hq 32, Hk 8, D 128, bf16), batch-invariant against the normal kernels in
the same process, as kernel time (CUDA events, median of reps) and as a fraction of the bf16
dense roofline (--peak TFLOP/s, H200 989).

- prefill of one T-token prompt: batch-invariant rows of 2+ tokens now run on the decode tile
  (BLOCK_M 16: 4 tokens a program at GQA 4, mma.sync) with their keys in 256-key spans, where
  the normal kernel takes 16 tokens a program on a 64-row tile (wgmma);
- a 300-token chunk over a 2048-token prefix beside 64 decode rows (a mixed step);
- decode at batch 1 and 64 (the decode launch is unchanged in work: its spans now count from
  key 0, which moves nothing without a sliding window).

    python bench/device/bichunk_perf.py --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from halserve.hal.triton import attention as AT  # noqa: E402

HQ, HK, D, BS = 32, 8, 128, 16


def case(qlens, ctxs):
    """Inputs of one attention call: sequences with qlens new tokens over ctxs cached ones."""
    dev = "cuda"
    lens = [q + c for q, c in zip(qlens, ctxs)]
    nblk = [(n + BS - 1) // BS for n in lens]
    width = max(nblk)
    kv = torch.randn(2, sum(nblk), BS, HK, D, device=dev, dtype=torch.bfloat16)
    bt = torch.zeros(len(lens), width, dtype=torch.int32, device=dev)
    start = 0
    for i, n in enumerate(nblk):
        bt[i, :n] = torch.arange(start, start + n, dtype=torch.int32, device=dev)
        start += n
    cu = torch.tensor([0] + torch.tensor(qlens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    seq = torch.tensor(lens, dtype=torch.int32, device=dev)
    q = torch.randn(sum(qlens), HQ, D, device=dev, dtype=torch.bfloat16)
    flops = sum(4 * HQ * D * (q_ * c + q_ * (q_ + 1) / 2) for q_, c in zip(qlens, ctxs))  # causal QK + PV
    return (q, kv, cu, seq, bt, max(qlens), max(lens)), flops


def time_ms(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peak", type=float, default=989.0, help="bf16 dense TFLOP/s of the card")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    cases = {
        "prefill 1024": ([1024], [0]),
        "prefill 4096": ([4096], [0]),
        "chunk 300 over 2048 + 64 decode rows": ([300] + [1] * 64, [2048] + [1167] * 64),
        "decode b1 ctx 2048": ([1], [2047]),
        "decode b64 ctx 1168": ([1] * 64, [1167] * 64),
    }
    rows = []
    for name, (qlens, ctxs) in cases.items():
        (q, kv, cu, seq, bt, mq, mk), flops = case(qlens, ctxs)
        res = {"case": name, "gflop": flops / 1e9}
        for label, bi in (("normal", False), ("bi", True)):
            ms = time_ms(lambda: AT.attention(q, kv, cu, seq, bt, BS, mq, mk, D ** -0.5, batch_invariant=bi,
                                              kv_len_bound=mk), a.reps)
            res[f"{label}_ms"] = ms
            res[f"{label}_roofline"] = flops / (ms * 1e-3) / (a.peak * 1e12)
        res["bi_over_normal"] = res["bi_ms"] / res["normal_ms"]
        rows.append(res)
        print(f"{name:40s} normal {res['normal_ms']:.3f} ms ({res['normal_roofline']:.1%} of roofline)  "
              f"bi {res['bi_ms']:.3f} ms ({res['bi_roofline']:.1%})  bi/normal {res['bi_over_normal']:.2f}x",
              flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "peak_tflops": a.peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""cpu_amx decode attention alone: a batched decode step's attention op, timed apart.

    python bench/cpu_attention.py [--threads 2] [--rows 32] [--ctx 16,64,128,136,256,512] [--layers 22] [--shared]

For each context length: ``rows`` single-token queries (TinyLlama's heads: 32 q, 4 kv, D 64,
bf16, 16-token blocks) over ``layers`` separate caches (one call per layer, as a step makes),
best of 15 passes. Prints ms a pass, us per (row, kv head, key span) (attention.c's span of
SPAN keys; a work item is one of these, or all kv heads of a row's span when the rows fill
the cores) and the K+V bytes read per second, against a multi-threaded read of the same
process (torch sum over 1 GiB) as the floor. ``--shared``: every row reads the same blocks (one
sequence's worth of cache a layer, in L2): the compute alone, without the memory."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from halserve.hal.cpu_amx.backend import CpuAmxBackend  # noqa: E402
from halserve.hal.interface import AttentionMetadata  # noqa: E402

SPAN = 256  # attention.c's SPAN: keys per decode span


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--ctx", default="16,64,128,136,256,512")
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--shared", action="store_true", help="every row's block table names the same blocks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    b = CpuAmxBackend()
    b.lib.hs_set_threads(args.threads)
    s, hq, hk, d, bs = args.rows, 32, 4, 64, 16
    a = torch.ones(1 << 28)
    a.sum()
    t = time.perf_counter()
    a.sum()
    read = a.numel() * 4 / (time.perf_counter() - t) / 1e9
    del a
    print(f"{b.describe().split(' accelerated')[0]} tier={b.tier}, {args.threads} threads, read {read:.1f} GB/s; "
          f"{s} rows, {args.layers} layers", flush=True)
    for ctx in (int(c) for c in args.ctx.split(",")):
        nblk = -(-ctx // bs)
        blocks = nblk if args.shared else s * nblk
        caches = [torch.randn(2, blocks + 1, bs, hk, d, dtype=torch.bfloat16) for _ in range(args.layers)]
        tables = torch.arange(1, blocks + 1, dtype=torch.int32)
        meta = AttentionMetadata(
            cu_seqlens_q=torch.arange(s + 1, dtype=torch.int32), seq_lens=torch.full((s,), ctx, dtype=torch.int32),
            block_tables=tables.repeat(s, 1) if args.shared else tables.reshape(s, nblk),
            slot_mapping=torch.zeros(s, dtype=torch.int64), max_seqlen_q=1, max_seqlen_k=ctx,
            query_lens_host=[1] * s, seq_lens_host=[ctx] * s, block_size=bs, num_decode_seqs=s)
        q = torch.randn(s, hq, d, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        best = float("inf")
        for _ in range(15):
            t = time.perf_counter()
            for c in caches:
                b.attention(q, c, meta, d ** -0.5, out)
            best = min(best, time.perf_counter() - t)
        items = s * hk * (-(-ctx // SPAN)) * args.layers
        kv = s * ctx * hk * d * 2 * 2 * args.layers  # as read by the rows (--shared: from L2)
        print(f"ctx {ctx:5}: {best * 1e3:7.2f} ms a pass, {best * 1e6 / items:5.2f} us a head's span, "
              f"K+V {kv / 1e6:6.1f} MB at {kv / best / 1e9:5.1f} GB/s ({100 * kv / best / 1e9 / read:3.0f}% of the read)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``halserve bench NAME``: each benchmark is a module here with add_arguments + main."""
from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "serve": "stream against a running server: TTFT, TPOT, ITL, throughput",
    "latency": "batch-1 decode latency vs the bandwidth roofline and HF transformers (CUDA graphs)",
    "decode": "batch-1 decode ms/token on any backend (CPU too) vs the roofline and HF transformers",
    "throughput": "offline throughput vs HF transformers generate",
    "startup": "process start to first answered request of `halserve serve`",
    "offload": "TTFT of a long prompt: recompute vs host-tier vs filesystem-tier hit",
    "spec": "speculative decoding: speed-up over plain decode by acceptance rate and k, and n-gram on Python",
    "cpu": "CPU decode (batch 1 and batched) vs the read roofline, llama.cpp and HF transformers",
    "soak": "N streaming clients for T minutes with disconnects and bad inputs injected (reliability)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="BENCH")
    from halserve.cli import ARGV

    positional = [a for a in ARGV if not a.startswith("-")]
    chosen = positional[1] if len(positional) > 1 else None
    for name, help_ in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            mod = importlib.import_module(f"halserve.bench.{name}")
            mod.add_arguments(sp)
            sp.set_defaults(_bench_run=mod.main)


def main(args: argparse.Namespace) -> int:
    run = getattr(args, "_bench_run", None)
    if run is None:
        print("usage: halserve bench {" + ",".join(BENCHES) + "} ...")
        return 2
    return int(run(args) or 0)

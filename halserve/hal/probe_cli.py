"""``halserve probe [--json]``: every backend with score, chosen mark and reason; hardware facts."""
from __future__ import annotations

import argparse
import json
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def _chosen(rows) -> tuple[str | None, str | None]:
    """(name, error): what select() would pick, without instantiating anything heavy."""
    from halserve import hal

    try:
        return hal.select().name, None
    except Exception as e:
        return None, str(e)


def _fmt_gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def main(args: argparse.Namespace) -> int:
    from halserve import hal
    from halserve.hal.probe import hardware_facts

    rows = hal.available()
    chosen, error = _chosen(rows)
    facts = hardware_facts()
    if args.json:
        print(json.dumps({
            "chosen": chosen,
            "error": error,
            "forced": os.environ.get(hal.ENV_VAR),
            "backends": [{"name": n, "score": p.score, "reason": p.reason, "device": p.device,
                          "chosen": n == chosen} for n, _, p in rows],
            "hardware": facts,
        }, indent=2))
        return 0 if chosen else 1
    width = max(len(n) for n, _, _ in rows)
    print(f"{'backend':<{width}}  score  chosen  reason")
    for n, _, p in rows:
        print(f"{n:<{width}}  {p.score:>5}  {'*' if n == chosen else '':^6}  {p.reason}")
    if error:
        print(f"no backend chosen: {error}")
    cpu = facts.get("cpu", {})
    print()
    print(f"cpu:   {cpu.get('model', '?')} ({cpu.get('arch', '?')}, {cpu.get('cores', '?')} cores)")
    if "flags" in cpu:
        print(f"flags: {' '.join(cpu['flags']) or '(none of interest)'}")
    if "isa" in cpu:
        ext = cpu.get("riscv", {})
        print(f"isa:   {cpu['isa'] or '?'} (V extension: {'yes' if ext.get('v') else 'no'})")
    gpus = facts.get("gpus") or []
    if not gpus:
        print("gpus:  none visible to torch")
    for g in gpus:
        if "error" in g:
            print(f"gpu:   error: {g['error']}")
        else:
            print(f"gpu {g['index']}: {g['vendor']} {g['name']} (capability {g['capability']}, "
                  f"{_fmt_gib(g['memory_bytes'])})")
    return 0 if chosen else 1

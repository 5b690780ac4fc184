"""The rocm backend's Triton kernels under CDNA configs, run through conformance on an NVIDIA
GPU (a check run: configs of ``--arch``, fp8 as e4m3fn, HIP-only options not applied).
``python -m halserve.hal.rocm.check_on_cuda --arch gfx942 [--quick] [--json out]``."""
from __future__ import annotations

import argparse
import json
import sys

from halserve.hal import conformance as C
from halserve.hal.rocm import RocmBackend


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", required=True, choices=["gfx942", "gfx950"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-invariant", action="store_true")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    b = RocmBackend("cuda", batch_invariant=a.batch_invariant, arch=a.arch)
    print(b.describe(), flush=True)
    rep = C.run(b, quick=a.quick, on_result=lambda r: print(r.line(), flush=True))
    print(f"rocm[{a.arch} configs{' batch-invariant' if a.batch_invariant else ''}] on {b.device_name}: "
          f"{rep.passed}/{len(rep.results)} passed, {rep.failed} failed", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump([{"op": r.op, "case": r.case, "status": r.status, "how": r.how, "detail": r.detail}
                       for r in rep.results], f, indent=1)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())

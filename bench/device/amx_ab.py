"""`halserve bench cpu` with cpu_amx's AMX GEMM choices overridden, for A/B runs on the AMX host:

    AMX_MIN_M=1 AMX_ROWS=16 python bench/device/amx_ab.py bench cpu --quant none --backends cpu_amx ...

AMX_MIN_M: fewest activation rows the AMX tile kernel takes (backend.AMX_MIN_M, default 2: batch-1
decode runs the C GEMV); AMX_ROWS: W rows per block (hs_set_amx_rows: 16, 32, or 0 = the default);
AMX_PF_FLAGS: hs_set_amx_prefetch's flags at a 512-byte distance (4: the next block into L2 in
address order, 16: not; 0 or unset: the default, which does it with 32-row blocks only).
The AMX host's kernel table (session 7, a 400 MB weight set, partly in its 300 MB L3) had the
16-row AMX kernel 0-31% faster than the GEMV at M = 1; this A/B asks whether a decode token is."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import halserve.hal.cpu_amx.backend as B  # noqa: E402

B.AMX_MIN_M = int(os.environ.get("AMX_MIN_M", B.AMX_MIN_M))
_rows = int(os.environ.get("AMX_ROWS", "0"))
_pf = os.environ.get("AMX_PF_FLAGS")
_init = B.CpuAmxBackend.__init__


def _init_rows(self, *a, **k):
    _init(self, *a, **k)
    self.lib.hs_set_amx_rows(_rows)
    if _pf is not None:
        self.lib.hs_set_amx_prefetch(512, int(_pf))


B.CpuAmxBackend.__init__ = _init_rows
print(f"[amx_ab] AMX_MIN_M={B.AMX_MIN_M} AMX_ROWS={_rows} AMX_PF_FLAGS={_pf}", flush=True)
from halserve.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))

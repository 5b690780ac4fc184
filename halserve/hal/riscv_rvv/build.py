"""Building and loading the kernel library: the scalar build with the system compiler
(any machine), the RVV build on riscv64 with V, or a prebuilt (cross-compiled) library
named by ``HALSERVE_RISCV_RVV_LIB``."""
from __future__ import annotations

import platform
from pathlib import Path

from halserve.hal import cbuild
from halserve.hal.probe import riscv_extensions

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("*.c"))
HEADER = HERE / "hs_rvv.h"
_LIB: list = []


def cdef() -> str:
    text = HEADER.read_text()
    return text.split("/* ABI BEGIN */")[1].split("/* ABI END */")[0]


def riscv_isa() -> "tuple[bool, bool]":
    """(is riscv64, has the V extension) from /proc/cpuinfo's isa line."""
    if platform.machine() != "riscv64":
        return False, False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("isa"):
                    return True, riscv_extensions(line.split(":", 1)[1])["v"]
    except OSError:
        pass
    return True, False


def flags() -> "tuple[list[str], list[str]]":
    _riscv, has_v = riscv_isa()
    march = ["-march=rv64gcv"] if has_v else []
    return ["-O3", "-std=c11", "-D_GNU_SOURCE", *march], ["-lm"]


def load():
    """(ffi, lib); OpenMP when the compiler has it, else one thread. Raises CBuildError."""
    if _LIB:
        return _LIB[0]
    cflags, ldflags = flags()
    try:
        pair = cbuild.load_library("riscv_rvv", SOURCES, cdef(), [*cflags, "-fopenmp"], [*ldflags, "-fopenmp"])
    except cbuild.CBuildError:
        pair = cbuild.load_library("riscv_rvv", SOURCES, cdef(), cflags, ldflags)
    _LIB.append(pair)
    return pair


def describe(info: int) -> str:
    kind = f"RVV 1.0, VLEN {info >> 8}" if info & 1 else "scalar"
    return f"{kind}, {'OpenMP' if info & 2 else 'one thread'}"

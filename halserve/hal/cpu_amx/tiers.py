"""Which ISA tier this CPU runs: AMX > AVX-512 > AVX2, from /proc/cpuinfo flags, the C
build, and (for AMX) the kernel's permission. ``HALSERVE_CPU_TIER`` forces a lower tier."""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass

from halserve.hal.cbuild import CBuildError
from halserve.hal.cpu_amx import lib as _lib

ENV = "HALSERVE_CPU_TIER"
SCORES = {"amx": 30, "avx512": 20, "avx2": 10}


@dataclass(slots=True)
class Tier:
    name: str | None  # None: no tier runs here
    reason: str
    ffi: object = None
    lib: object = None


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


_CHOSEN: Tier | None = None


def choose() -> Tier:
    """The best tier that builds, loads and is allowed here (cached per process)."""
    global _CHOSEN
    if _CHOSEN is None:
        _CHOSEN = _choose()
    return _CHOSEN


def _choose() -> Tier:
    if platform.machine() not in ("x86_64", "AMD64"):
        return Tier(None, f"not an x86-64 CPU ({platform.machine()})")
    forced = os.environ.get(ENV, "").strip().lower() or None
    if forced and forced not in _lib.TIERS:
        return Tier(None, f"{ENV}={forced!r} is not valid; use {', '.join(_lib.TIERS)}")
    flags = cpu_flags()
    notes = []
    order = _lib.TIERS[_lib.TIERS.index(forced):] if forced else _lib.TIERS
    for name in order:
        missing = [f for f in _lib.NEEDS[name] if f not in flags]
        if missing:
            notes.append(f"{name}: CPU lacks {', '.join(missing)}")
            continue
        try:
            ffi, lib = _lib.load(name)
        except CBuildError as e:
            notes.append(f"{name}: {e}")
            continue
        if name == "amx":
            rc = lib.hs_amx_request()
            if rc != 0:
                notes.append(f"amx: the kernel refused AMX tile state (arch_prctl errno {-rc})")
                continue
        why = f"{name} tier" + (f" ({ENV}={forced})" if forced else "")
        if notes:
            why += "; " + "; ".join(notes)
        return Tier(name, why, ffi, lib)
    return Tier(None, "no x86 tier runs here: " + "; ".join(notes))

"""Hardware facts for backend probes and ``halserve probe``: cheap, never raises.

Reads /proc/cpuinfo and platform; asks torch about GPUs only when torch is already
imported or importable without side effects (no subprocesses, nothing that can hang).
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import os
import platform
import sys

# CPU flags the backends care about (x86 names as in /proc/cpuinfo).
X86_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx512_fp16",
             "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def _cpuinfo() -> dict[str, str]:
    """First occurrence of each key in /proc/cpuinfo (one core is representative)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    info.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    return info


def riscv_extensions(isa: str) -> dict[str, bool]:
    """Parse a RISC-V ISA string (e.g. 'rv64imafdcv_zicsr_zvfh'): base letters and the
    extensions the RVV backend cares about."""
    isa = isa.lower().strip()
    if not isa.startswith("rv"):
        return {"v": False}
    body = isa[2:].lstrip("0123456789")
    parts = body.split("_")
    letters = parts[0]
    multi = set(parts[1:])
    return {
        "v": "v" in letters or "v" in multi,
        "zvfh": "zvfh" in multi,
        "zvfbfmin": "zvfbfmin" in multi,
        "zvl256b": "zvl256b" in multi,
    }


def cpu_facts() -> dict:
    info = _cpuinfo()
    arch = platform.machine().lower()
    facts: dict = {
        "arch": arch,
        "model": info.get("model name") or info.get("uarch") or info.get("cpu model") or platform.processor() or arch,
        "cores": os.cpu_count() or 1,
    }
    flags = set((info.get("flags") or info.get("features") or "").split())
    if arch in ("x86_64", "amd64", "i686"):
        facts["flags"] = [f for f in X86_FLAGS if f in flags]
    elif flags:
        facts["flags"] = sorted(flags)[:64]
    isa = info.get("isa")
    if isa or arch.startswith("riscv"):
        facts["isa"] = isa or ""
        facts["riscv"] = riscv_extensions(isa or "")
    return facts


def _torch_if_cheap():
    """torch if it is already imported or installed; None otherwise (never raises)."""
    if "torch" in sys.modules:
        return sys.modules["torch"]
    try:
        if importlib.util.find_spec("torch") is None:
            return None
        import torch

        return torch
    except Exception:  # a broken install must not break probing
        return None


def gpu_facts() -> list[dict]:
    torch = _torch_if_cheap()
    if torch is None:
        return []
    gpus = []
    try:
        if not torch.cuda.is_available():
            return []
        vendor = "amd" if getattr(torch.version, "hip", None) else "nvidia"
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            entry = {"index": i, "vendor": vendor, "name": p.name,
                     "capability": f"{p.major}.{p.minor}", "memory_bytes": int(p.total_memory)}
            arch = getattr(p, "gcnArchName", None)
            if vendor == "amd" and arch:
                entry["arch"] = arch.split(":")[0]
            gpus.append(entry)
    except Exception as e:
        gpus.append({"error": f"{type(e).__name__}: {e}"})
    return gpus


@functools.lru_cache(maxsize=1)
def _facts() -> dict:
    facts: dict = {"cpu": {}, "gpus": []}
    try:
        facts["cpu"] = cpu_facts()
    except Exception as e:
        facts["cpu"] = {"error": f"{type(e).__name__}: {e}"}
    try:
        facts["gpus"] = gpu_facts()
    except Exception as e:
        facts["gpus"] = [{"error": f"{type(e).__name__}: {e}"}]
    facts["python"] = platform.python_version()
    facts["torch"] = getattr(sys.modules.get("torch"), "__version__", None)
    return facts


def hardware_facts() -> dict:
    """{'cpu': {arch, model, cores, flags, [isa, riscv]}, 'gpus': [{index, vendor, name,
    capability, memory_bytes}], 'python', 'torch'}. Cached; never raises."""
    try:
        return copy.deepcopy(_facts())
    except Exception as e:  # belt and braces: probing must never take the process down
        return {"cpu": {}, "gpus": [], "error": f"{type(e).__name__}: {e}"}


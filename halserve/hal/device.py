"""Torch-device facts and chores, the one place outside a backend package that knows a
device type: free/total memory, waiting for queued work, the current stream, page-locking
host memory, and clearing CUDA's sticky last error. NativeBackend runs on any torch device
through these helpers, so native.py itself has no device branches."""
from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger("halserve")


def _read_meminfo() -> tuple[int, int] | None:
    try:
        vals = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                vals[key] = int(rest.split()[0]) * 1024
        return vals.get("MemAvailable", vals.get("MemFree", 0)), vals["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def host_memory_info() -> tuple[int, int]:
    """(available, total) bytes of host memory."""
    info = _read_meminfo()
    if info is not None:
        return info
    page = os.sysconf("SC_PAGE_SIZE")
    return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page


def memory_info(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of the memory ``device`` allocates from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total)
    return host_memory_info()


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def current_stream(device: torch.device):
    """The stream work on ``device`` is queued on now, or None where work runs in order."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


def pin_host(device: torch.device, t: torch.Tensor):
    """Page-lock ``t``'s host memory for fast asynchronous copies to ``device``
    (cudaHostRegister); returns the undo function, or None where there is nothing to do."""
    if device.type != "cuda":
        return None
    cudart = torch.cuda.cudart()
    ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    if int(err) != 0:
        # the failure stays this thread's last CUDA error, which torch's next kernel
        # launch check would report as its own: clear it
        clear_cuda_last_error()
        raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed: {cudart.cudaGetErrorString(err)}")
    return lambda: cudart.cudaHostUnregister(ptr)


def clear_cuda_last_error() -> None:
    """``cudaGetLastError`` (which also resets it) in the CUDA runtime torch loaded; torch's
    ``cudart()`` bindings lack it."""
    import ctypes

    # every CUDA runtime mapped into the process (torch's, and any other a library brought):
    # the failed call's error sits in the one torch uses, which need not be the first mapped
    paths: list[str | None] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "libcudart" in line and line.split()[-1] not in paths:
                    paths.append(line.split()[-1])
    except OSError:
        pass
    for path in paths + [None]:  # None: the symbols already global
        try:
            ctypes.CDLL(path).cudaGetLastError()
        except (OSError, AttributeError) as e:
            logger.debug("cannot reach cudaGetLastError in %s (%s)", path, e)

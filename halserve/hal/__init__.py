"""The hardware abstraction layer: find, probe and pick a backend.

``select()`` probes every known backend (in-tree, registered, and out-of-tree through the
``halserve.backends`` entry point group) and returns an instance of the best one;
``HALSERVE_BACKEND=name[:index]`` or ``select(name)`` forces one. Importing this package is
cheap: no torch, no backend module is imported until something is probed.
"""
from __future__ import annotations

import importlib
import logging
import os
from typing import TYPE_CHECKING

from halserve.hal.interface import OPS, ProbeResult

if TYPE_CHECKING:
    from halserve.hal.interface import Backend

__all__ = ["KNOWN_BACKENDS", "PREFERENCE", "OPS", "ProbeResult", "available", "select", "current",
           "register", "create", "backend_class", "interpreter_ok", "parse_backend_name"]

logger = logging.getLogger("halserve")

# name -> "module:Class". A module that does not exist yet is listed as "not implemented yet".
KNOWN_BACKENDS: dict[str, str] = {
    "cuda": "halserve.hal.cuda:CudaBackend",
    "rocm": "halserve.hal.rocm:RocmBackend",
    "cpu_amx": "halserve.hal.cpu_amx:CpuAmxBackend",
    "riscv_rvv": "halserve.hal.riscv_rvv:RvvBackend",
    "native": "halserve.hal.native:NativeBackend",
}
# Tie-break order for equal probe scores: accelerators first, native last.
PREFERENCE: tuple[str, ...] = ("cuda", "rocm", "cpu_amx", "riscv_rvv", "native")
ENTRY_POINT_GROUP = "halserve.backends"
ENV_VAR = "HALSERVE_BACKEND"
NOT_IMPLEMENTED = "not implemented yet"

_registered: dict[str, type] = {}
_current: "Backend | None" = None


def register(cls: type) -> type:
    """Add a backend class (usable as a decorator); it replaces a known one of the same name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == "abstract":
        raise ValueError(f"backend class {cls!r} needs a class attribute `name` (a short string)")
    _registered[name] = cls
    return cls


def _entry_points() -> dict:
    try:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    except Exception as e:  # a broken distribution must not break probing
        logger.debug("halserve.backends entry points unreadable: %s", e)
        return {}


def _load(spec: str) -> "tuple[type | None, str | None]":
    """(class, None) or (None, why not)."""
    mod_name, _, attr = spec.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            return None, NOT_IMPLEMENTED
        return None, f"import failed: {e}"
    except Exception as e:
        return None, f"import failed: {type(e).__name__}: {e}"
    cls = getattr(mod, attr, None)
    if cls is None:
        return None, NOT_IMPLEMENTED
    return cls, None


def _candidates() -> "dict[str, tuple[type | None, str | None]]":
    """name -> (class or None, reason it is missing), in preference order."""
    found: dict[str, tuple[type | None, str | None]] = {}
    for name, ep in _entry_points().items():
        try:
            found[name] = (ep.load(), None)
        except Exception as e:
            found[name] = (None, f"entry point {ep.value} failed to load: {type(e).__name__}: {e}")
    for name, spec in KNOWN_BACKENDS.items():
        if name not in found or found[name][0] is None:
            found[name] = _load(spec)
    for name, cls in _registered.items():
        found[name] = (cls, None)
    return dict(sorted(found.items(), key=lambda kv: _rank(kv[0])))


def _probe(cls: type) -> ProbeResult:
    try:
        result = cls.probe()
        if not isinstance(result, ProbeResult):
            return ProbeResult(0, f"probe() returned {type(result).__name__}, not ProbeResult")
        return result
    except Exception as e:  # probe() must never raise; if it does, the backend is out
        return ProbeResult(0, f"probe raised {type(e).__name__}: {e}")


def available() -> "list[tuple[str, type | None, ProbeResult]]":
    """Every backend with its class (None when it cannot be imported) and probe result,
    in preference order (cuda, rocm, cpu_amx, riscv_rvv, native, then others by name)."""
    rows = []
    for name, (cls, why) in _candidates().items():
        rows.append((name, cls, ProbeResult(0, why or "") if cls is None else _probe(cls)))
    return rows


def backend_class(name: str) -> "type | None":
    """The class of a backend by name, or None when it is unknown or not importable."""
    return _candidates().get(name, (None, None))[0]


def parse_backend_name(value: str) -> tuple[str, int | None]:
    """'cuda:1' -> ('cuda', 1); 'native' -> ('native', None)."""
    name, sep, index = value.strip().partition(":")
    if not sep:
        return name, None
    if not index.isdigit():
        from halserve.errors import BackendUnavailable

        raise BackendUnavailable(f"backend {value!r}: the part after ':' must be a device index, e.g. {name}:0")
    return name, int(index)


def _device(probe_device: str, index: int | None) -> str:
    if index is None:
        return probe_device
    return f"{probe_device.split(':')[0]}:{index}"


def _interpreter_ok(cls: type) -> bool:
    hook = getattr(cls, "interpreter_ok", None)
    try:
        return bool(hook()) if callable(hook) else False
    except Exception:
        return False


def _rank(name: str) -> tuple[int, str]:
    """The tie rule for equal probe scores: in-tree backends in PREFERENCE order, then every
    other (out-of-tree or registered) backend by name. An out-of-tree backend that must win
    a tie scores higher instead (e.g. 101 beside cuda's 100)."""
    return (PREFERENCE.index(name), "") if name in PREFERENCE else (len(PREFERENCE), name)


def select(name: str | None = None, batch_invariant: bool = False) -> "Backend":
    """An instance of the backend to use, which also becomes ``current()``.

    ``name`` (or else ``HALSERVE_BACKEND``) forces one, as 'name' or 'name:index'; a forced
    backend that cannot run here raises ``BackendUnavailable`` with its probe's reason. A
    forced backend whose probe says 0 still runs on the CPU when its class says
    ``interpreter_ok()`` (e.g. Triton kernels under TRITON_INTERPRET=1). Otherwise the
    highest probe score wins; ties go to the earlier of cuda, rocm, cpu_amx, riscv_rvv,
    native, then to other backends by name (``_rank``). With ``batch_invariant`` only
    backends that support it are chosen.
    """
    from halserve.errors import BackendUnavailable

    global _current
    forced = name or os.environ.get(ENV_VAR) or None
    rows = available()
    if forced:
        backend, why = _create(forced, rows, batch_invariant)
        bname, device = parse_backend_name(forced)[0], backend.device
        if not name:
            why = f"{ENV_VAR}={forced}; {why}"
    else:
        usable = sorted((r for r in rows if r[1] is not None and r[2].score > 0),
                        key=lambda r: (-r[2].score, _rank(r[0])))
        backend, skipped = None, []
        for bname, cls, result in usable:
            backend = _start(bname, cls, result.device, batch_invariant)
            if not isinstance(backend, str):
                device = result.device
                why = f"highest probe score {result.score}: {result.reason}"
                break
            skipped.append(backend)
            backend = None
        if backend is None:
            reasons = "; ".join(skipped + [f"{n}: {p.reason}" for n, _, p in rows if p.score <= 0])
            raise BackendUnavailable(f"no backend can run here ({reasons})")
    others = "; ".join(f"{n}: {p.reason}" for n, _, p in rows if n != bname)
    logger.info("HAL backend %s on %s (%s) [others: %s]", bname, device, why, others or "none")
    _current = backend
    return backend


def create(name: str, batch_invariant: bool = False) -> "Backend":
    """An instance of the named backend ('name' or 'name:index') without making it
    current: the forced path of ``select``. Raises ``BackendUnavailable`` with the probe's
    reason when it cannot run here (unless its class says ``interpreter_ok()``)."""
    return _create(name, available(), batch_invariant)[0]


def _create(forced: str, rows, batch_invariant: bool) -> "tuple[Backend, str]":
    from halserve.errors import BackendUnavailable

    bname, index = parse_backend_name(forced)
    match = [r for r in rows if r[0] == bname]
    if not match:
        raise BackendUnavailable(f"unknown backend {bname!r}; known: {', '.join(r[0] for r in rows)}")
    _, cls, result = match[0]
    device = _device(result.device, index)
    if cls is not None and result.score <= 0 and _interpreter_ok(cls):
        device = "cpu"
        why = f"forced; probe says {result.reason!r} but it runs in interpreter mode"
    elif cls is None or result.score <= 0:
        raise BackendUnavailable(f"backend {bname!r} cannot run here: {result.reason}")
    else:
        why = f"forced; probe: {result.reason}"
    backend = _start(bname, cls, device, batch_invariant)
    if isinstance(backend, str):
        raise BackendUnavailable(backend)
    return backend, why


def interpreter_ok(cls: type) -> bool:
    """True when a backend class can run its kernels in an interpreter on the CPU."""
    return _interpreter_ok(cls)


def _start(name: str, cls: type, device: str, batch_invariant: bool) -> "Backend | str":
    """An instance, or a string saying why it could not start."""
    try:
        backend = cls(device=device, batch_invariant=batch_invariant)
    except Exception as e:
        return f"backend {name!r} failed to start on {device}: {type(e).__name__}: {e}"
    if batch_invariant:
        try:
            ok = bool(backend.capabilities.batch_invariant)
        except Exception:
            ok = False
        if not ok:
            return f"backend {name!r} does not support batch-invariant mode"
    return backend


def current() -> "Backend":
    """The backend chosen by the last ``select()``; selects one if none was chosen yet."""
    return _current if _current is not None else select()

"""Captured decode steps for cpu_amx: CUDA-graph-like replay with (almost) no Python.

A batch-1 decode step is ~10 op calls a layer; each costs 3-8 us of Python and dispatch when
warm and ~100 us when the GEMV before it has streamed ~100 MB through the caches and evicted
the interpreter's working set: milliseconds a step that llama.cpp, with no Python in its step,
does not pay. ``capture(backend, fn, args)`` runs ``fn`` once to warm lazy caches, then once
recording: every C kernel call (the backend's ``lib`` is swapped for a recording proxy) and
every torch op (a ``TorchDispatchMode`` over aten ops) lands in one plan, in call order.
Replay reruns the plan on the same memory, as a CUDA graph does:

- runs of consecutive C calls go to ``hs_graph_run`` (graph.c) as one flat int64 program;
- view and metadata ops need nothing (every storage is fixed), nor do ``empty`` allocations
  (whatever fills them is in the plan); in-place and ``out=`` ops rerun as they are; other
  torch ops rerun and are copied into the tensors they returned at capture;
- every tensor the step touched is kept alive by the graph (its memory pool).

What a step reads on the host is baked in at capture, so capture refuses (returns None: the
engine runs that step eagerly) where that could change the result: an op returning a Python
value (``.item()``, ``.tolist()``), one whose output shape depends on data, attention that
leaves the C kernel, and any query longer than one token (prefill.py's flash path slices by
host lengths; the prefill-tail and verify graphs pad query rows past the last sequence's,
which the C kernel does not map): decode steps only. The C attention's one
host value, ``max_seqlen_k``, is the engine's ``max_model_len`` at capture: an upper bound
that only adds empty key spans (skipped, bitwise the same result).

``HALSERVE_CPU_GRAPHS``: ``1`` (default) captures, ``0`` runs every step eagerly.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ENV = "HALSERVE_CPU_GRAPHS"
# graph.c's entry: address, check flag, GRAPH_INTS integers, GRAPH_FLOATS floats
INTS, FLOATS = 20, 4
SLOTS = 2 + INTS + FLOATS
_INT_TYPES = {"int", "unsigned int", "long", "unsigned long", "long long", "unsigned long long", "short",
              "unsigned short", "char", "signed char", "unsigned char", "_Bool", "int8_t", "uint8_t", "int16_t",
              "uint16_t", "int32_t", "uint32_t", "int64_t", "uint64_t", "intptr_t", "uintptr_t", "size_t",
              "ssize_t"}
# allocations: their contents come from the ops that fill them, which are in the plan
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
# output shapes that depend on the data: replay could not keep them
_DATA_SHAPED = {"nonzero", "nonzero_static", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
                "repeat_interleave", "_local_scalar_dense", "equal", "is_nonzero"}


def enabled() -> bool:
    """Whether cpu_amx captures decode steps (``HALSERVE_CPU_GRAPHS``)."""
    v = os.environ.get(ENV, "1").strip().lower()
    if v not in ("0", "1"):
        raise ValueError(f"{ENV}={v!r} is not valid; use 1 (capture decode steps) or 0 (run them eagerly)")
    return v == "1"


class CaptureRefused(Exception):
    """The step reads something on the host that a replay would not see change."""


class CpuGraph:
    """A captured step: ``replay()`` reruns it on the captured memory and returns the captured
    output object (copy new inputs into the captured tensors first)."""

    __slots__ = ("steps", "output", "keep", "num_c", "num_torch", "nbytes")

    def __init__(self, steps: list, output, keep: list, num_c: int, num_torch: int, nbytes: int = 0):
        self.steps = steps
        self.output = output
        self.keep = keep  # every tensor the plan points into
        self.num_c, self.num_torch = num_c, num_torch
        self.nbytes = nbytes  # its own buffers (activations, logits), resident while it lives

    def replay(self):
        with torch.inference_mode():
            for s in self.steps:
                s()
        return self.output

    __call__ = replay


class _RecordingLib:
    """Stands in for the backend's cffi library while a step is captured: each kernel call
    runs and is appended to the plan with its result."""

    def __init__(self, lib, plan: list):
        self._lib, self._plan = lib, plan

    def __getattr__(self, name: str):
        fn = getattr(self._lib, name)

        def call(*args):
            ret = fn(*args)
            self._plan.append(("c", name, fn, args, ret))
            return ret

        return call


def _tensors(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    def __init__(self, plan: list, keep: list):
        super().__init__()
        self.plan, self.keep = plan, keep
        self.fresh: dict = {}  # storage address -> bytes of the buffers the step allocated

    def _fresh(self, outs: list) -> None:
        for t in outs:
            s = t.untyped_storage()
            self.fresh[s.data_ptr()] = s.nbytes()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if name in _DATA_SHAPED:
            raise CaptureRefused(f"{func} reads data on the host or shapes its output by it")
        out = func(*args, **kwargs)
        outs = _tensors(out)
        if not isinstance(out, torch.Tensor) and (not isinstance(out, (list, tuple)) or len(outs) != len(out)):
            raise CaptureRefused(f"{func} returns a host value ({type(out).__name__})")
        ins = _tensors(args) + _tensors(kwargs)
        self.keep.extend(ins)
        self.keep.extend(outs)
        schema = func._schema
        if any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            self.plan.append(("inplace", func, args, kwargs))
        elif name in _ALLOC:  # a fresh buffer needs nothing: what fills it is in the plan
            self._fresh(outs)
        else:
            # by storage, not schema: 'to' may alias (a no-op) or copy, views alias
            shared = {_storage(t) for t in ins}
            aliased = [_storage(t) in shared for t in outs]
            if not any(aliased):
                self.plan.append(("functional", func, args, kwargs, outs))
                self._fresh(outs)
            elif not all(aliased):
                raise CaptureRefused(f"{func} returned some outputs aliasing its inputs and some fresh")
        return out


def _inplace(func, args, kwargs):
    return lambda: func(*args, **kwargs)


_COPIES = {"contiguous", "clone", "to", "_to_copy"}  # their values are a copy_ of their input's


def _functional(func, args, kwargs, outs):
    src = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if func._schema.name.split("::")[-1] in _COPIES and src is not None and len(outs) == 1 \
            and outs[0].device == src.device:
        dst = outs[0]
        return lambda: dst.copy_(src)  # one pass, no temporary

    def run():
        res = func(*args, **kwargs)
        for dst, src in zip(outs, _tensors(res)):
            dst.copy_(src)
    return run


def _layout(ffi, fn) -> "tuple[int, list[bool], bool] | None":
    """(address, which arguments are floats, whether the result is an int) of a kernel that
    graph.c can call, or None (it is then called from Python)."""
    try:
        t = ffi.typeof(fn)
        addr = int(ffi.cast("uintptr_t", fn))
    except (TypeError, AttributeError):
        return None
    if t.kind != "function" or t.ellipsis:
        return None
    floats = []
    for a in t.args:
        if a.kind == "pointer" or (a.kind == "primitive" and a.cname in _INT_TYPES):
            floats.append(False)
        elif a.kind == "primitive" and a.cname == "float":
            floats.append(True)
        else:  # a double, a struct: not in graph.c's one call shape
            return None
    if floats.count(True) > FLOATS or floats.count(False) > INTS:
        return None
    res = t.result
    if res.kind != "void" and not (res.kind == "primitive" and res.cname in _INT_TYPES):
        return None
    return addr, floats, res.kind != "void"


def _entry(layout, args: tuple, ret) -> list[int]:
    addr, floats, is_int = layout
    ints, fl = [], []
    for a, is_f in zip(args, floats):
        if is_f:
            fl.append(struct.unpack("<I", struct.pack("<f", float(a)))[0])
        else:
            ints.append(int(a) & 0xFFFFFFFFFFFFFFFF)
    # a kernel that returned 0 at capture must return 0 at replay (an error code otherwise)
    row = [addr, int(is_int and ret == 0), *ints, *[0] * (INTS - len(ints)), *fl, *[0] * (FLOATS - len(fl))]
    return [v - (1 << 64) if v >= 1 << 63 else v for v in row]


_GRAPH_CDEF = """
int hs_graph_run(uintptr_t prog, int n);
int hs_graph_copy(uintptr_t src, uintptr_t dst, int kind, int64_t n0, int64_t n1, int64_t n2, int64_t n3, int64_t s0,
                  int64_t s1, int64_t s2, int64_t s3, int64_t d0, int64_t d1, int64_t d2, int64_t d3);
int hs_graph_embed(uintptr_t weight, uintptr_t ids, uintptr_t dst, int64_t n, int64_t row_bytes, int64_t rows);
"""


def replay_lib():
    """(ffi, lib) of graph.c: its own small build (it calls kernels by address, so it needs no
    tier's flags and none of their declarations)."""
    from halserve.hal.cbuild import load_library

    return load_library("cpu_amx_graph", [Path(__file__).with_name("graph.c")], _GRAPH_CDEF, ["-O2"])


def _copy_args(src: torch.Tensor, dst: torch.Tensor) -> "tuple | None":
    """hs_graph_copy's arguments for ``dst.copy_(src)`` where it can do it exactly (same shape,
    at most 4 dims, same dtype or bfloat16 -> float32, no overlap), else None."""
    if src.shape != dst.shape or src.dim() > 4 or src.device.type != "cpu" or dst.device.type != "cpu":
        return None
    if src.dtype == dst.dtype and not src.dtype.is_complex and src.element_size() in (1, 2, 4, 8):
        kind = src.element_size()
    elif src.dtype == torch.bfloat16 and dst.dtype == torch.float32:
        kind = 16
    else:
        return None
    if _storage(src) == _storage(dst):
        return None
    pad = 4 - src.dim()
    return (src.data_ptr(), dst.data_ptr(), kind, *([1] * pad), *src.shape, *([0] * pad), *src.stride(),
            *([0] * pad), *dst.stride())


def _as_c(e, gffi, glib) -> "tuple | None":
    """A torch entry of the plan as one of graph.c's own entries (layout, args), or None."""
    func, args = e[1], e[2]
    name = func._schema.name.split("::")[-1]
    ts = [a for a in args if isinstance(a, torch.Tensor)]
    a = None
    fn = glib.hs_graph_copy
    if e[0] == "functional" and name in _COPIES and ts and args[0] is ts[0] and len(e[4]) == 1:
        a = _copy_args(args[0], e[4][0])
    elif e[0] == "inplace" and name == "copy_" and len(ts) == 2 and args[0] is ts[0]:
        a = _copy_args(args[1], args[0])
    elif e[0] == "functional" and name in ("embedding", "index_select") and len(e[4]) == 1 and (
            name == "embedding" or (len(args) == 3 and args[1] == 0)):  # index_select(w, 0, ids)
        w, ids, dst = args[0], args[1 if name == "embedding" else 2], e[4][0]
        if isinstance(ids, torch.Tensor) and w.dim() == 2 and w.is_contiguous() and ids.dtype == torch.int64 and ids.is_contiguous() \
                and dst.is_contiguous() and dst.dtype == w.dtype and tuple(dst.shape) == (*ids.shape, w.shape[1]):
            fn = glib.hs_graph_embed
            a = (w.data_ptr(), ids.data_ptr(), dst.data_ptr(), ids.numel(), w.shape[1] * w.element_size(),
                 w.shape[0])
    if a is None:
        return None
    return _layout(gffi, fn), a


def _c_run(rows: list, names: list):
    """One ``hs_graph_run`` call over the program ``rows``."""
    prog = torch.tensor(rows, dtype=torch.int64).contiguous()
    ptr, n, run_fn = prog.data_ptr(), len(rows), replay_lib()[1].hs_graph_run

    def run():
        rc = run_fn(ptr, n)
        if rc:
            raise RuntimeError(f"cpu_amx graph replay: {names[rc - 1] if rc > 0 else 'this ABI'} failed (rc {rc})")
    run.prog = prog  # keeps the program alive with the step
    return run


def _attention_guard(backend, plan: list):
    """The backend's attention while capturing: refuses a step with a query longer than one
    token (a prefill tail, a speculative verify: their flash path slices by host lengths, and
    the C kernel maps no query row past the last sequence's, which their padding rows are),
    and one that does not run exactly one C kernel call (a torch fallback)."""
    attention = backend.attention  # the dispatching bound method

    def guarded(q, kv_cache, meta, *a, **kw):
        if any(n != 1 for n in meta.query_lens_host):
            raise CaptureRefused("only decode steps (one query token a sequence) are captured: longer queries "
                                 "take the flash path by host lengths or pad rows past the last sequence")
        before = sum(1 for e in plan if e[0] == "c" and e[1] == "hs_attention")
        out = attention(q, kv_cache, meta, *a, **kw)
        if sum(1 for e in plan if e[0] == "c" and e[1] == "hs_attention") != before + 1:
            raise CaptureRefused("attention did not run as one C kernel call (a fallback reads host lengths)")
        return out

    return guarded


def _moe_guard(backend, plan: list):
    """The backend's moe while capturing: refuses a call that does not run as exactly one fused
    C kernel call (the per-expert path splits the sorted pairs by expert counts read on the
    host with ``.tolist()``, which no dispatch mode sees: a replay would keep the capture's
    split and send tokens through the wrong experts)."""
    moe = backend.moe

    def guarded(*a, **kw):
        before = sum(1 for e in plan if e[0] == "c" and e[1] == "hs_moe")
        out = moe(*a, **kw)
        if sum(1 for e in plan if e[0] == "c" and e[1] == "hs_moe") != before + 1:
            raise CaptureRefused("moe did not run as one fused C kernel call (the per-expert path splits "
                                 "tokens by expert counts read on the host)")
        return out

    return guarded


# Tensor methods that read data on the host without an aten op the dispatch mode would see
_HOST_READS = ("tolist", "numpy")


def _refuse_host_read(name: str):
    def refused(self, *a, **kw):
        raise CaptureRefused(f"Tensor.{name}() reads data on the host (a replay would keep the capture's values)")
    return refused


def record(backend, fn, args: tuple) -> tuple[list, object, list, int]:
    """Run ``fn(*args)`` once recording: (plan, output, tensors to keep, bytes of the buffers the
    step allocated: what the graph holds beyond the weights and the KV cache)."""
    plan: list = []
    keep: list = []
    rec = _Recorder(plan, keep)
    lib = backend.lib
    backend.lib = _RecordingLib(lib, plan)
    backend.attention = _attention_guard(backend, plan)
    backend.moe = _moe_guard(backend, plan)
    saved = {n: getattr(torch.Tensor, n) for n in _HOST_READS}
    try:
        for n in _HOST_READS:
            setattr(torch.Tensor, n, _refuse_host_read(n))
        with torch.inference_mode(), rec:
            out = fn(*args)
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        backend.lib = lib
        del backend.attention  # back to the class's dispatching methods
        del backend.moe
    keep.extend(_tensors(out))
    return plan, out, keep, sum(rec.fresh.values())


def build(ffi, plan: list) -> tuple[list, int, int]:
    """Replay steps from a plan: (steps, C calls, torch ops)."""
    steps, rows, names, nc, nt = [], [], [], 0, 0
    layouts: dict = {}
    gffi, glib = replay_lib()
    for e in plan:
        if e[0] != "c":
            own = _as_c(e, gffi, glib)
            if own is not None:  # a copy or an embedding gather: stays in the C run
                rows.append(_entry(own[0], own[1], 0))
                names.append(e[1]._schema.name)
                nt += 1
                continue
        if e[0] == "c":
            nc += 1
            name, fn, args, ret = e[1:]
            if name not in layouts:
                layouts[name] = _layout(ffi, fn)
            if layouts[name] is not None:
                rows.append(_entry(layouts[name], args, ret))
                names.append(name)
                continue
        if rows:
            steps.append(_c_run(rows, names))
            rows, names = [], []
        if e[0] == "c":  # a kernel graph.c cannot call: from Python
            fn, args = e[2], e[3]
            steps.append(lambda fn=fn, a=args: fn(*a))
        elif e[0] == "inplace":
            steps.append(_inplace(*e[1:]))
            nt += 1
        else:
            steps.append(_functional(*e[1:]))
            nt += 1
    if rows:
        steps.append(_c_run(rows, names))
    return steps, nc, nt


# Largest decode bucket captured. A captured bucket keeps its step's buffers resident (not
# counted where the KV cache is sized): ~1.5 MB a row for a 1.1B Llama, ~6 MB for an 8B. Up to
# GRAPH_FREE_ROWS rows a bucket is always kept; a larger one only while its buffers stay within
# GRAPH_BIG_BYTES (a 1.1B's 64-row bucket holds ~95 MB; an 8B's 48- and 64-row ones are
# refused). The goal sizes (16, 64 sequences) need them: a 32-row step here spent ~5-10% of its
# time in Python and dispatch (docs/performance.md, "Batched decode, session 5").
GRAPH_MAX_ROWS = 64
GRAPH_FREE_ROWS = 16
GRAPH_BIG_BYTES = 256 << 20


def capture(backend, fn, args: tuple) -> "CpuGraph | None":
    """The captured step, or None (with the reason in ``backend.graph_refusal``) when it reads
    host values a replay would not see."""
    with torch.inference_mode():
        warm = fn(*args)  # warm-up: lazily made caches (weight plans, rope tables) exist before recording
    rows = (warm[0] if isinstance(warm, tuple) else warm).shape[0]
    if rows > GRAPH_MAX_ROWS:
        backend.graph_refusal = (f"a step of {rows} rows runs eagerly: captured buckets go up to {GRAPH_MAX_ROWS} "
                                 "rows (the Python a replay saves is a small share of a larger step, and every "
                                 "captured bucket keeps its activations resident)")
        return None
    try:
        plan, out, keep, nbytes = record(backend, fn, args)
        if rows > GRAPH_FREE_ROWS and nbytes > GRAPH_BIG_BYTES:
            raise CaptureRefused(f"a step of {rows} rows runs eagerly: its graph would keep {nbytes / 2**20:.0f} MiB "
                                 f"of buffers resident (buckets above {GRAPH_FREE_ROWS} rows are kept up to "
                                 f"{GRAPH_BIG_BYTES / 2**20:.0f} MiB each)")
        steps, nc, nt = build(backend.ffi, plan)
    except CaptureRefused as e:
        backend.graph_refusal = str(e)
        return None
    return CpuGraph(steps, out, keep, nc, nt, nbytes)

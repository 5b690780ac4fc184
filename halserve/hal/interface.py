"""The HAL contract on one page: the Backend base class, its data types, op signatures and
the dispatcher.

A backend is a subclass of ``NativeBackend`` (``halserve.hal.native``). It overrides the ops
it accelerates and inherits the rest, so every backend runs every model from day one.

Constructor: ``Backend(device: str | torch.device | None = None, batch_invariant: bool = False)``;
``hal.select``/``hal.create`` pass the probe's device (or ``name:index``'s) and the engine's
``--batch-invariant``. Call ``super().__init__(device, batch_invariant)``.

Hooks (mandatory first; every other one has the default shown):

| hook | default |
| --- | --- |
| ``name`` (class attribute) | mandatory: the short name for ``HALSERVE_BACKEND``, ``halserve probe`` |
| ``probe()`` classmethod -> ProbeResult | mandatory: cheap, never raises; score 0 = not on this machine |
| ``interpreter_ok()`` classmethod -> bool | False; True: a forced backend whose probe says 0 still runs on the CPU (Triton interpreter) |
| ``capabilities`` property -> Capabilities | ``Capabilities()`` (NativeBackend: what torch has here) |
| ``supports(op, **spec)`` -> True / str | True for an op the class defines, else "native fallback: ..."; see below |
| ``describe()`` -> str | the start-up line: accelerated ops, native ops |
| ``kv_cache_shape(num_blocks, block_size, num_kv_heads, head_dim)`` | ``(2, blocks, block_size, kv_heads, head_dim)`` |
| ``pack_weight(weight, scheme="none", *, act_scheme=None)`` | NativeBackend: keep or quantize (``hal.quant``) |
| ``memory_info()`` -> (free, total) | NativeBackend: the device's (``hal.device``) |
| ``default_kv_cache_bytes(gpu_memory_utilization, profile=None)`` | 1 GiB, at most a quarter of what is free |
| ``synchronize()`` | nothing to wait for (NativeBackend: the device's) |
| ``capture_graph(fn, *args)`` | None: run eagerly |
| ``copy_stream(lane=0)`` | a null context: copies run in order |
| ``event()`` | None: device work runs in order |
| ``pin_host(t)`` | None: nothing to page-lock |
| ``empty_host(shape, dtype)`` | ``torch.empty`` pinned when ``capabilities.pin_memory`` (KV offload buffers) |
| op methods (table below) | NativeBackend's pure-torch ops |

The dispatcher. Every op call ``backend.<op>(...)`` goes through one dispatcher: it derives a
spec from the call's real arguments (``spec_of``, the same function the conformance harness
uses), asks ``supports(op, **spec)`` once per distinct spec (answers are cached per instance:
they must depend only on the spec and on construction-time state), then runs

- ``True``: the backend's own method for the op;
- ``"native fallback: <why>"``: NativeBackend's op;
- ``"refused: <why>"``: raises ``halserve.errors.OpRefused`` naming the op, spec and reason.

A backend's "accelerated" ops are derived: the op methods its class (or a parent other than
NativeBackend) defines; ``accelerated_ops`` is no longer read. ``supports`` answering True for
an op the class does not define reads as native fallback. Override ``supports`` to answer
True only for specs a kernel handles, "native fallback: ..." otherwise, and end with
``return super().supports(op, **spec)`` (which refuses what no path can run). Read spec keys
with ``spec.get`` (a caller may pass fewer). An op body never calls ``super().<op>()`` as a
hidden fallback: ``native_ran`` (a Counter by op on every instance) counts each native op
body run for a non-native backend, and the conformance suite fails a case reported
accelerated that reaches native.

Spec keys (``SPEC_KEYS``; values: torch dtypes, ints, bools, strings, tuples):

| op | keys |
| --- | --- |
| linear | dtype (x's), scheme (stored: none/int8/fp8), act_scheme, m, k, n, bias, out, contiguous (x) |
| rms_norm | dtype, hidden_size, residual, out, contiguous (x and residual) |
| rotary | dtype, head_dim, rot_dim, is_neox, num_heads, num_kv_heads, unit_stride (q, k last dim), contiguous |
| silu_and_mul | dtype, intermediate_size, out, contiguous |
| write_kv | dtype (k's), kv_dtype, head_dim, num_kv_heads, block_size, cache_shape, unit_stride (k, v), contiguous (cache) |
| rotary_write_kv | dtype (q's), kv_dtype, head_dim, rot_dim, is_neox, num_heads, num_kv_heads, block_size, cache_shape, unit_stride (q, k, v), contiguous (q, k, v), cache_contiguous, qk_norm |
| attention | dtype (q's), kv_dtype, num_heads, num_kv_heads, head_dim, block_size, sliding_window, cache_shape, out |
| moe | dtype, num_experts, top_k, scoring, scheme, w2_scheme, act_scheme, num_expert_group, topk_group, renormalize, correction_bias (present), out |
| swap_blocks | dtype, src_device, dst_device (device types) |
| copy_blocks | dtype |
| sample | dtype, all_greedy, all_random, no_top_k, no_top_p, no_min_p, out |

``out`` says whether the caller passed ``out=``; ``cache_shape`` is ``kv_cache.shape[2:]``
(block_size and num_kv_heads are read from dims 2 and 3, true of the default layout: a
backend with its own layout reads ``cache_shape``). ``m`` is the number of rows of x.

Layout contract (what a C or Triton kernel may assume; the engine's call form first):

- linear: x [M, K] contiguous from the engine (``contiguous`` says when not), x's dtype;
  bias [N] in x's dtype or None; returns [M, N] in x's dtype (``out`` [M, N] contiguous when
  given). The weight is what this backend's ``pack_weight`` made: scheme none [N, K] in the
  model dtype; int8/fp8 values [N, K] with a float32 scale [1] or [N].
- rms_norm: x [T, H] (row stride may exceed H: ``contiguous``), weight [H] in x's dtype,
  residual [T, H] or None. x is not written; residual may be overwritten with h (as vLLM's
  fused kernel does); returns out, or (out, h) with h = x + residual in x's dtype.
- rotary: in place on q [T, Hq, D] and k [T, Hk, D] (contiguous from the engine; in
  general any row/head strides, unit stride on D unless ``unit_stride`` is False);
  positions [T] int64; cos_sin_cache [max_pos, rot_dim] float32 contiguous (cos half, sin
  half); only the first rot_dim of D rotate.
- silu_and_mul: x [T, 2I] contiguous -> [T, I] in x's dtype.
- write_kv: key, value [T, Hk, D] (may be column slices of one qkv tensor: unit stride on
  D unless ``unit_stride`` is False); kv_cache: one layer of the backend's own
  ``kv_cache_shape`` layout (dim 0: k/v, dim 1: block), a contiguous view into a stacked
  [L, ...] tensor; slot_mapping [T] int64, slot = block * block_size + offset, -1 = skip.
- rotary_write_kv: rotary's q, k, positions and cos_sin_cache, then write_kv's k (as
  rotated), v, kv_cache and slot_mapping, in one call: the fusion a backend may run as one
  kernel. NativeBackend's is the composite (``self.rotary`` then ``self.write_kv``), so a
  backend without its own fused kernel keeps its two accelerated pieces. With
  ``q_norm_weight`` / ``k_norm_weight`` [D] (Qwen3's per-head RMSNorm) q and k are first
  normalised per head row (``rms_norm`` with ``norm_eps``, stored in their dtype).
- KV cache dtype (``kv_dtype``): the model dtype, or float8_e4m3fn (``--kv-cache-dtype fp8``,
  hal/kv_fp8.py) with per-layer float ``k_scale`` / ``v_scale`` (keyword-only args of write_kv
  and attention: stored = fp8(x / scale), read = stored * scale). The engine passes the scales
  only with an fp8 cache, so a backend whose ``supports`` never answers True for an fp8
  ``kv_dtype`` may leave them out of its kernels' signatures.
- attention: q [T, Hq, D] (may be a strided view), kv_cache as for write_kv; metadata
  tensors int32 contiguous on the device (cu_seqlens_q [S+1], seq_lens [S], block_tables
  [S, max_blocks]); returns a new [T, Hq, D] tensor in q's dtype (or ``out``).
- moe: x [T, H] contiguous, router_logits [T, E] (x's dtype); w13.weight [E, 2I, H], w2.weight
  [E, H, I] with scales [E, N] or [1]; ``MoeSpec.correction_bias`` [E] float32 or None.
- swap_blocks: src and dst of the same layout with dim 1 the block index; either may be a
  strided view (a host staging buffer transposed) and on another device; block_mapping
  [n, 2] int64 on the CPU. copy_blocks: contiguous caches, mapping [n, 2] int64.
- sample: logits [B, V] float32 contiguous; ``SamplingTensors`` on the device (dtypes in its
  docstring); returns [B] int64.

Every op takes plain tensors and ints, so the same call works from torch, Triton, Gluon or
cffi (``data_ptr()`` plus the strides above).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # keep `import halserve.hal` free of torch at import time
    import torch

logger = logging.getLogger("halserve")

OPS: tuple[str, ...] = (
    "linear",
    "rms_norm",
    "rotary",
    "silu_and_mul",
    "write_kv",
    "rotary_write_kv",
    "attention",
    "moe",
    "swap_blocks",
    "copy_blocks",
    "sample",
)


@dataclass(slots=True)
class ProbeResult:
    """Outcome of a backend probe: score 0 means 'not on this machine'; reason says why."""

    score: int
    reason: str
    device: str = "cpu"


@dataclass(slots=True)
class Capabilities:
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    quant_schemes: tuple[str, ...] = ("none", "int8", "fp8")
    fp8_formats: tuple[str, ...] = ("e4m3",)
    fp4_formats: tuple[str, ...] = ()
    graphs: bool = False
    batch_invariant: bool = True
    pin_memory: bool = False  # host staging buffers (KV offload) should be page-locked
    # device work runs apart from the host (a stream the host only queues on), so the engine
    # can build step n+1 while step n runs (async scheduling); None: true when the backend's
    # device is not the host CPU
    async_device: bool | None = None


@dataclass(slots=True)
class PackedWeight:
    """A linear weight as the backend stores it. ``weight`` is [N, K] for scheme 'none'.

    scheme: 'none' | 'fp8' | 'int8'. For quantized schemes ``weight`` holds the quantized
    values ([N, K]) and ``scale`` the dequantization scale: shape [1] (per-tensor) or [N]
    (per-channel). ``act_scheme`` is how activations are quantized at run time for W8A8:
    'none' (weight-only: dequantize then GEMM), 'per_tensor' or 'per_token'.
    ``extra`` holds backend-private layouts (AMX tiles, RVV panels, ...).
    """

    weight: "torch.Tensor"
    scheme: str = "none"
    scale: "torch.Tensor | None" = None
    act_scheme: str = "none"
    out_features: int = 0
    in_features: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AttentionMetadata:
    """Describes one flat batch of query tokens for ``write_kv`` and ``attention``.

    The batch holds ``num_seqs`` sequences; sequence i contributes query tokens
    ``cu_seqlens_q[i]:cu_seqlens_q[i+1]`` which are the *last* ``query_len`` positions of a
    context of ``seq_lens[i]`` tokens (so a prefill with a cached prefix, a chunked prefill
    and a decode are all the same case). Attention is causal: query token at absolute
    position p sees keys 0..p. Keys and values for every context token, including the new
    ones, are read from the paged cache through ``block_tables`` (``write_kv`` runs first).

    Device tensors (int32 unless noted):
      cu_seqlens_q [num_seqs + 1], seq_lens [num_seqs], block_tables [num_seqs, max_blocks]
      (padding entries are 0 and must not be read past seq_lens), slot_mapping [num_tokens]
      int64 (-1 = do not write). Host copies (python lists) of the query and context lengths
      let pure-torch paths avoid device->host syncs. In a captured decode graph the host
      copies keep their capture-time values (max_seqlen_k = max_model_len): graph-capable
      backends must take per-row lengths from the device tensors.
    """

    cu_seqlens_q: "torch.Tensor"
    seq_lens: "torch.Tensor"
    block_tables: "torch.Tensor"
    slot_mapping: "torch.Tensor"
    max_seqlen_q: int
    max_seqlen_k: int
    query_lens_host: list[int]
    seq_lens_host: list[int]
    block_size: int
    num_decode_seqs: int = 0  # leading sequences with query_len == 1 (decode-only prefix)
    sliding_window: int | None = None  # None: full attention

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_host)


@dataclass(slots=True)
class SamplingTensors:
    """Per-row sampling parameters for ``sample``, already on the device.

    temperature [B] float32 (0 = greedy), top_k [B] int32 (0 or >= vocab = off),
    top_p [B] float32 (1 = off), min_p [B] float32 (0 = off), seeds [B] int64 and
    steps [B] int64: the random draw for row b depends only on (seeds[b], steps[b]) and the
    logits row, never on the rest of the batch, so seeded requests are reproducible.
    ``all_greedy`` / ``no_top_k`` / ``no_top_p`` / ``no_min_p`` are host-side hints that let
    a backend skip work; they must be consistent with the tensors.
    """

    temperature: "torch.Tensor"
    top_k: "torch.Tensor"
    top_p: "torch.Tensor"
    min_p: "torch.Tensor"
    seeds: "torch.Tensor"
    steps: "torch.Tensor"
    all_greedy: bool = False
    all_random: bool = False
    no_top_k: bool = True
    no_top_p: bool = True
    no_min_p: bool = True


@dataclass(slots=True)
class MoeSpec:
    """Routing of a mixture-of-experts layer.

    scoring: 'softmax' (Mixtral, Qwen3-MoE) or 'sigmoid' (DeepSeek-V3 style).
    renormalize: divide the top-k weights by their sum.
    num_expert_group / topk_group: grouped routing: experts are split into
    ``num_expert_group`` groups, a group's score is the sum of its top-2 expert scores
    (sigmoid with ``correction_bias``) or its max (softmax), and only experts of the best
    ``topk_group`` groups are eligible. ``correction_bias`` [E] is added to the scores for
    choosing experts only (weights use the unbiased scores). ``routed_scaling_factor``
    multiplies the final weights.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True
    num_expert_group: int = 1
    topk_group: int = 1
    correction_bias: "torch.Tensor | None" = None
    routed_scaling_factor: float = 1.0


class Backend:
    """Abstract base: see the module docstring. Concrete backends derive from NativeBackend."""

    name: ClassVar[str] = "abstract"
    # Derived per class (never hand-kept): the ops a class or a parent other than
    # NativeBackend defines (``accelerated_ops``, the old hand-kept set, is not read).
    kernel_ops: ClassVar[frozenset[str]] = frozenset()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _install(cls)

    def __init__(self, device: "str | torch.device | None" = None, batch_invariant: bool = False):
        self.device = device
        self.batch_invariant = batch_invariant
        # op -> how often NativeBackend's op body ran for this (non-native) backend, by a
        # fallback or a super() call: the conformance suite resets and reads it per case
        self.native_ran: Counter[str] = Counter()
        self._supports_cache: dict[tuple, "bool | str"] = {}

    # ---- discovery -------------------------------------------------------------------
    @classmethod
    def probe(cls) -> ProbeResult:  # mandatory
        raise NotImplementedError

    @classmethod
    def interpreter_ok(cls) -> bool:  # optional
        """True when this backend's kernels can run in an interpreter on the CPU (forced by
        name although its probe says 0). Default: False."""
        return False

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities()

    def supports(self, op: str, **spec: Any) -> "bool | str":
        """True if ``op`` with this spec runs accelerated here, else a reason string
        starting with 'native fallback:' or 'refused:'."""
        if op not in OPS:
            return f"refused: unknown op {op!r}; ops are {', '.join(OPS)}"
        if op in type(self).kernel_ops:
            return True
        return f"native fallback: {self.name} has no {op} kernel"

    def describe(self) -> str:
        """One line for the start-up log: which ops run this backend's kernels and which
        run the native (pure torch) ones."""
        from halserve.hal.quant import FP8_DTYPE

        acc = [op for op in OPS if op in type(self).kernel_ops and self.supports(op) is True]
        native = [op for op in OPS if op not in acc]
        # the lists are for a model-dtype KV cache: name the KV ops an fp8 cache sends to native
        fp8 = [op for op in ("write_kv", "attention")
               if op in acc and FP8_DTYPE is not None and self.supports(op, kv_dtype=FP8_DTYPE) is not True]
        return (f"backend={self.name} device={self.device} accelerated=[{', '.join(acc) or 'none'}] "
                f"native=[{', '.join(native) or 'none'}]"
                + (f" fp8-kv-cache=native[{', '.join(fp8)}]" if fp8 else ""))

    # ---- memory, layout ---------------------------------------------------------------
    def kv_cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int) -> tuple[int, ...]:
        """Shape of one layer's KV cache; dim 0 must be 2 (k, v) and dim 1 the block index."""
        return (2, num_blocks, block_size, num_kv_heads, head_dim)

    def pack_weight(self, weight: "torch.Tensor", scheme: str = "none", *,
                    act_scheme: str | None = None) -> PackedWeight:
        """Repack a weight [N, K] (or [E, N, K]) once at load; ``scheme`` is a key of
        ``hal.quant.WEIGHT_SCHEMES``, ``act_scheme`` overrides its activation scheme."""
        raise NotImplementedError

    def memory_info(self) -> tuple[int, int]:
        """(free_bytes, total_bytes) of the memory this backend allocates from."""
        raise NotImplementedError

    def default_kv_cache_bytes(self, gpu_memory_utilization: float, profile=None) -> int:
        """KV cache bytes when the user sets no ``kv_cache_memory``. ``profile()`` runs one
        worst-case forward step (device backends call it to measure peak activation memory
        before sizing). Default, for host memory: 1 GiB, at most a quarter of what is free."""
        free, _total = self.memory_info()
        return max(min(1 << 30, free // 4), 1 << 20)

    def synchronize(self) -> None:
        """Wait for queued device work. Default: nothing to wait for."""

    def capture_graph(self, fn, *args):  # optional
        """Optional graph capture of ``fn(*args)`` for replay; default None (run eagerly)."""
        return None

    def copy_stream(self, lane: int = 0):  # optional
        """A context manager under which device work is queued on a copy stream, after the
        work queued so far on the current one, and runs beside what is queued next (KV
        blocks copied in while the model runs). Each ``lane`` is its own stream, so one
        lane's copy can run while another lane's next step waits on it. Default: one
        stream (a null context)."""
        return contextlib.nullcontext()

    def pin_host(self, t: "torch.Tensor"):  # optional
        """Page-lock host memory allocated elsewhere (the KV host tier, in memory shared with
        reader processes) so that copies between it and the device run asynchronously at
        full speed, where this backend wants that (``capabilities.pin_memory``). Returns a
        function that undoes it, or None (the default) where there is nothing to do."""
        return None

    def empty_host(self, shape: tuple[int, ...], dtype: "torch.dtype") -> "torch.Tensor":  # optional
        """A host buffer for KV transfers (offload tiers, staging). Default: ``torch.empty``,
        page-locked when ``capabilities.pin_memory``."""
        import torch

        return torch.empty(shape, dtype=dtype, pin_memory=bool(self.capabilities.pin_memory))

    def event(self):  # optional
        """A marker between streams, or None (the default) where device work runs in order:
        ``record()`` marks the work queued on the current stream so far; ``wait()`` holds
        the current stream's later work until that is done; ``query()`` says (without
        waiting) whether it is done. ``wait()`` may be captured in a graph: a replay then
        waits for the marker's latest ``record()``."""
        return None

    # ---- ops (signatures; NativeBackend implements them all) ----------------------------
    def linear(self, x: "torch.Tensor", w: PackedWeight, bias: "torch.Tensor | None" = None,
               out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """y = x @ W^T (+ bias); x [M, K] -> [M, N]."""
        raise NotImplementedError

    def rms_norm(self, x: "torch.Tensor", weight: "torch.Tensor", eps: float,
                 residual: "torch.Tensor | None" = None, out: "torch.Tensor | None" = None):
        """Without residual: returns norm(x) * weight. With residual: h = x + residual;
        returns (norm(h) * weight, h). Computed in float32, stored in x's dtype."""
        raise NotImplementedError

    def rotary(self, positions: "torch.Tensor", q: "torch.Tensor", k: "torch.Tensor",
               cos_sin_cache: "torch.Tensor", is_neox: bool = True) -> None:
        """In place on q [T, Hq, D] and k [T, Hk, D]. cos_sin_cache [max_pos, rot_dim]
        (first half cos, second half sin, float32); rotates the first rot_dim dims.
        neox style rotates halves; gpt-j style rotates interleaved pairs."""
        raise NotImplementedError

    def silu_and_mul(self, x: "torch.Tensor", out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """x [T, 2I] -> silu(x[:, :I]) * x[:, I:]."""
        raise NotImplementedError

    def write_kv(self, key: "torch.Tensor", value: "torch.Tensor", kv_cache: "torch.Tensor",
                 slot_mapping: "torch.Tensor", *, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
        """Scatter key/value [T, Hk, D] into kv_cache at slot_mapping (slot = block*bs + off);
        slot -1 is skipped. An fp8 cache stores ``hal.kv_fp8.quantize_kv(x, scale)``."""
        raise NotImplementedError

    def rotary_write_kv(self, positions: "torch.Tensor", q: "torch.Tensor", k: "torch.Tensor",
                        v: "torch.Tensor", cos_sin_cache: "torch.Tensor", is_neox: bool,
                        kv_cache: "torch.Tensor", slot_mapping: "torch.Tensor", *, k_scale: float = 1.0,
                        v_scale: float = 1.0, q_norm_weight: "torch.Tensor | None" = None,
                        k_norm_weight: "torch.Tensor | None" = None, norm_eps: float = 1e-6) -> None:
        """``rotary(positions, q, k, cos_sin_cache, is_neox)`` then ``write_kv(k, v, kv_cache,
        slot_mapping, k_scale=, v_scale=)``: q and k rotated in place, the rotated k (as
        stored in k's dtype) and v scattered into the cache, as the two ops would leave
        them. With the norm weights (both or neither), q and k are first replaced by
        ``rms_norm`` of each head row (weight [D], ``norm_eps``) in their dtype. One kernel
        where a backend has it (launches or C calls a layer fewer); NativeBackend runs the
        ops one by one."""
        raise NotImplementedError

    def attention(self, q: "torch.Tensor", kv_cache: "torch.Tensor", meta: AttentionMetadata,
                  scale: float, out: "torch.Tensor | None" = None, *, k_scale: float = 1.0,
                  v_scale: float = 1.0) -> "torch.Tensor":
        """Paged causal GQA attention. q [T, Hq, D] -> out [T, Hq, D]. An fp8 cache reads
        as stored * k_scale (keys) and stored * v_scale (values)."""
        raise NotImplementedError

    def moe(self, x: "torch.Tensor", router_logits: "torch.Tensor", w13: PackedWeight,
            w2: PackedWeight, spec: MoeSpec, out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """x [T, H], router_logits [T, E]; w13.weight [E, 2I, H] (gate rows then up rows),
        w2.weight [E, H, I]. Returns sum_k w_k * W2_e(silu(G_e x) * U_e x)."""
        raise NotImplementedError

    def swap_blocks(self, src: "torch.Tensor", dst: "torch.Tensor",
                    block_mapping: "torch.Tensor") -> None:
        """Copy blocks src[:, i] -> dst[:, j] for rows (i, j) of block_mapping [n, 2] int64
        (a CPU tensor, pinned where the backend pins host buffers, so that the call need
        not wait for the device); src and dst may be on different devices. Bit-exact.
        The caller does not change a mapping once passed: a backend may keep it, and its
        upload, for the next call (one mapping moving every layer of a batch in turn)."""
        raise NotImplementedError

    def copy_blocks(self, kv_caches: "list[torch.Tensor]", block_mapping: "torch.Tensor") -> None:
        """Within each layer cache, copy block i -> j for rows (i, j) of block_mapping."""
        raise NotImplementedError

    def sample(self, logits: "torch.Tensor", params: SamplingTensors,
               out: "torch.Tensor | None" = None) -> "torch.Tensor":
        """logits [B, V] float32 (already penalised) -> token ids [B] int64, no host sync."""
        raise NotImplementedError


# ---- the dispatcher -------------------------------------------------------------------------
# Each op's spec: what a kernel may care about, derived from the call's real arguments by a
# function with the op's own signature (so positional and keyword calls bind alike). The
# keys are the table in the module docstring; `spec_of` is what both the dispatcher and the
# conformance harness use, so the report and the run agree.

def _unit(*ts) -> bool:
    return all(t.stride(-1) == 1 for t in ts)


def _contig(*ts) -> bool:
    return all(t.is_contiguous() for t in ts if t is not None)


# Each key function returns (op, *values) in the order of SPEC_KEYS[op]: the dispatcher's
# cache key as it stands, a dict only when supports() must be asked.
SPEC_KEYS: dict[str, tuple[str, ...]] = {
    "linear": ("dtype", "scheme", "act_scheme", "k", "n", "bias", "out", "contiguous"),
    "rms_norm": ("dtype", "hidden_size", "residual", "out", "contiguous"),
    "rotary": ("dtype", "head_dim", "rot_dim", "is_neox", "num_heads", "num_kv_heads", "unit_stride", "contiguous"),
    "silu_and_mul": ("dtype", "intermediate_size", "out", "contiguous"),
    "write_kv": ("dtype", "kv_dtype", "head_dim", "num_kv_heads", "block_size", "cache_shape", "unit_stride",
                 "contiguous"),
    "rotary_write_kv": ("dtype", "kv_dtype", "head_dim", "rot_dim", "is_neox", "num_heads", "num_kv_heads",
                        "block_size", "cache_shape", "unit_stride", "contiguous", "cache_contiguous", "qk_norm"),
    "attention": ("dtype", "kv_dtype", "num_heads", "num_kv_heads", "head_dim", "block_size", "sliding_window",
                  "cache_shape", "out"),
    "moe": ("dtype", "num_experts", "top_k", "scoring", "scheme", "w2_scheme", "act_scheme", "num_expert_group",
            "topk_group", "renormalize", "correction_bias", "out"),
    "swap_blocks": ("dtype", "src_device", "dst_device"),
    "copy_blocks": ("dtype",),
    "sample": ("dtype", "all_greedy", "all_random", "no_top_k", "no_top_p", "no_min_p", "out"),
}


def _key_linear(x, w, bias=None, out=None):
    k = x.shape[-1]
    # no row count: it changes every step and no backend's answer depends on it
    return ("linear", x.dtype, w.scheme, w.act_scheme, k,
            w.out_features or w.weight.shape[-2], bias is not None, out is not None, x.is_contiguous())


def _key_rms_norm(x, weight, eps, residual=None, out=None):
    return ("rms_norm", x.dtype, x.shape[-1], residual is not None, out is not None, _contig(x, residual))


def _key_rotary(positions, q, k, cos_sin_cache, is_neox=True):
    return ("rotary", q.dtype, q.shape[-1], cos_sin_cache.shape[-1], bool(is_neox), q.shape[-2], k.shape[-2],
            _unit(q, k), _contig(q, k))


def _key_silu_and_mul(x, out=None):
    return ("silu_and_mul", x.dtype, x.shape[-1] // 2, out is not None, x.is_contiguous())


def _key_write_kv(key, value, kv_cache, slot_mapping, *, k_scale=1.0, v_scale=1.0):
    shape = tuple(kv_cache.shape)
    return ("write_kv", key.dtype, kv_cache.dtype, key.shape[-1], key.shape[-2], shape[2] if len(shape) > 2 else 0,
            shape[2:], _unit(key, value), kv_cache.is_contiguous())


def _key_rotary_write_kv(positions, q, k, v, cos_sin_cache, is_neox, kv_cache, slot_mapping, *, k_scale=1.0,
                         v_scale=1.0, q_norm_weight=None, k_norm_weight=None, norm_eps=1e-6):
    shape = tuple(kv_cache.shape)
    return ("rotary_write_kv", q.dtype, kv_cache.dtype, q.shape[-1], cos_sin_cache.shape[-1], bool(is_neox),
            q.shape[-2], k.shape[-2], shape[2] if len(shape) > 2 else 0, shape[2:], _unit(q, k, v),
            _contig(q, k, v), kv_cache.is_contiguous(), q_norm_weight is not None)


def _key_attention(q, kv_cache, meta, scale, out=None, *, k_scale=1.0, v_scale=1.0):
    shape = tuple(kv_cache.shape)
    return ("attention", q.dtype, kv_cache.dtype, q.shape[-2], shape[3] if len(shape) > 3 else 0, q.shape[-1],
            meta.block_size, meta.sliding_window, shape[2:], out is not None)


def _key_moe(x, router_logits, w13, w2, spec, out=None):
    return ("moe", x.dtype, router_logits.shape[-1], spec.top_k, spec.scoring, w13.scheme, w2.scheme,
            w13.act_scheme, spec.num_expert_group, spec.topk_group, spec.renormalize,
            spec.correction_bias is not None, out is not None)


def _key_swap_blocks(src, dst, block_mapping):
    return ("swap_blocks", src.dtype, src.device.type, dst.device.type)


def _key_copy_blocks(kv_caches, block_mapping):
    return ("copy_blocks", kv_caches[0].dtype if len(kv_caches) else None)


def _key_sample(logits, params, out=None):
    return ("sample", logits.dtype, params.all_greedy, params.all_random, params.no_top_k, params.no_top_p,
            params.no_min_p, out is not None)


_KEYS = {op: globals()[f"_key_{op}"] for op in OPS}


def spec_of(op: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The spec ``supports(op, **spec)`` is asked for the call ``backend.<op>(*args, **kwargs)``."""
    fn = _KEYS.get(op)
    if fn is None:
        raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    return dict(zip(SPEC_KEYS[op], fn(*args, **kwargs)[1:]))


def _normalise(backend: "Backend", op: str, answer: Any) -> "bool | str":
    """A supports() answer as the dispatcher acts on it: True only for an op the class has a
    kernel for (the native backend's own ops excepted), else a 'native fallback:' or
    'refused:' reason."""
    cls = type(backend)
    if answer is True:
        if op in OPS and op not in cls.kernel_ops and not cls.__dict__.get("_native_root"):
            return f"native fallback: {backend.name} has no {op} kernel"
        return True
    if isinstance(answer, str) and answer.startswith(("native fallback", "refused")):
        return answer
    if answer is False or answer is None:
        return f"native fallback: {backend.name}.supports answered {answer}"
    return f"refused: {answer}"


def _wrap_supports(fn):
    if getattr(fn, "_hal_wrapped", False):
        return fn

    @functools.wraps(fn)
    def supports(self, op, **spec):
        return _normalise(self, op, fn(self, op, **spec))

    supports._hal_wrapped = True
    return supports


def _counting(op: str, body, root: type):
    """A native op body that counts its runs for any backend but the native one itself."""
    @functools.wraps(body)
    def native(self, *args, **kwargs):
        if type(self) is not root:
            try:
                self.native_ran[op] += 1
            except AttributeError:  # a subclass that skipped Backend.__init__
                self.native_ran = Counter({op: 1})
        return body(self, *args, **kwargs)

    return native


def _dispatcher(op: str, kernel, native):
    keyf = _KEYS[op]

    @functools.wraps(kernel)
    def dispatch(self, *args, **kwargs):
        key = keyf(*args, **kwargs)
        cache = self.__dict__.setdefault("_supports_cache", {})  # set-up skipped by a subclass
        answer = cache.get(key)
        if answer is None:
            answer = cache[key] = self.supports(op, **dict(zip(SPEC_KEYS[op], key[1:])))
        if answer is True:
            return kernel(self, *args, **kwargs)
        if native is not None and answer.startswith("native fallback"):
            return native(self, *args, **kwargs)
        from halserve.errors import OpRefused

        shown = ", ".join(f"{k}={_show(v)}" for k, v in zip(SPEC_KEYS[op], key[1:]))
        raise OpRefused(f"backend {self.name!r} cannot run {op}({shown}): {answer}")

    dispatch._hal_kernel = kernel
    return dispatch


def _show(v: Any) -> str:
    return str(v).removeprefix("torch.")


def _install(cls: type) -> None:
    """Runs for every Backend subclass as it is defined (``__init_subclass__``)."""
    if "accelerated_ops" in cls.__dict__ and not cls.__dict__.get("_native_root"):
        logger.debug("%s.accelerated_ops is ignored: accelerated ops are the op methods a backend defines",
                     cls.__name__)
    if "supports" in cls.__dict__:
        cls.supports = _wrap_supports(cls.__dict__["supports"])
    if cls.__dict__.get("_native_root"):
        cls._native_ops = {op: _counting(op, cls.__dict__[op], cls) for op in OPS}
        for op in OPS:
            setattr(cls, op, _dispatcher(op, cls._native_ops[op], cls._native_ops[op]))
        cls.kernel_ops = frozenset()
    else:
        native = getattr(cls, "_native_ops", None) or {}
        for op in OPS:
            fn = cls.__dict__.get(op)
            if fn is not None and not hasattr(fn, "_hal_kernel"):
                setattr(cls, op, _dispatcher(op, fn, native.get(op)))
        kernels = set()
        for op in OPS:
            owner = next(c for c in cls.__mro__ if op in c.__dict__)
            if owner is not Backend and not owner.__dict__.get("_native_root"):
                kernels.add(op)
        cls.kernel_ops = frozenset(kernels)

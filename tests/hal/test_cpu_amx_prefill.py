"""cpu_amx prefill paths: long sequences' attention through torch's flash kernel on the
gathered K/V (beside decode and short rows in the C kernel of the same call), against a
float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

from halserve.hal.cpu_amx import prefill, quant
from tests.hal.test_cpu_amx import RUNNABLE, _meta, nmse

pytestmark = pytest.mark.skipif(not RUNNABLE, reason="cpu_amx needs an x86-64 CPU with AVX2 and FMA")


def reference(q, cache, meta, scale):
    """float64 causal attention straight from the paged cache, one query row at a time."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    hq, hk = q.shape[1], cache.shape[-2]
    bs, w = meta.block_size, meta.sliding_window or 0
    t = 0
    for i, (ql, sl) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        table = meta.block_tables[i]
        slots = [int(table[p // bs]) * bs + p % bs for p in range(sl)]
        k = cache[0].reshape(-1, hk, q.shape[2])[slots].double()
        v = cache[1].reshape(-1, hk, q.shape[2])[slots].double()
        for r in range(ql):
            pos = sl - ql + r
            lo = max(0, pos - w + 1) if w else 0
            for h in range(hq):
                kh = h // (hq // hk)
                s = (k[lo:pos + 1, kh] @ q[t, h].double()) * scale
                out[t, h] = torch.softmax(s, 0) @ v[lo:pos + 1, kh]
            t += 1
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_rows_take_flash_and_match_float64(dtype):
    """A batch mixing decode rows, short chunks and long prefills (two after a cached prefix,
    so their causal mask is bottom-right aligned), with and without a sliding window."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(5)
    hq, hk, d = 8, 2, 64
    calls = []
    real = prefill._flash
    for window in (None, 40):
        # flash: 70, 100, 33 rows, and 16 rows after a 284-key prefix; C: 1, 5, and 20 fresh rows
        ctx, ql = [90, 70, 130, 20, 77, 300, 20], [1, 70, 100, 5, 33, 16, 20]
        meta, nblk = _meta(ctx, ql, window=window)
        cache = torch.randn(2, nblk, 16, hk, d, generator=g).to(dtype)
        q = torch.randn(sum(ql), hq, d, generator=g).to(dtype)
        try:
            prefill._flash = lambda *a: calls.append(a[0].shape[0]) or real(*a)
            out = b.attention(q, cache, meta, 1 / math.sqrt(d))
        finally:
            prefill._flash = real
        ref = reference(q, cache, meta, 1 / math.sqrt(d))
        assert nmse(out, ref) < (1e-10 if dtype == torch.float32 else 3e-5), window
        for r in range(out.shape[0]):  # every row, not just the batch on average
            assert nmse(out[r], ref[r]) < (1e-9 if dtype == torch.float32 else 1e-4), (window, r)
    assert calls == [70, 100, 33, 16] * 2  # the long rows went through the flash kernel


def test_batch_invariant_mode_keeps_the_c_kernel():
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    b = CpuAmxBackend(batch_invariant=True)
    meta, nblk = _meta([64], [64])
    cache = torch.randn(2, nblk, 16, 2, 64)
    q = torch.randn(64, 4, 64)
    real, prefill._flash = prefill._flash, None  # calling it would fail
    try:
        out = b.attention(q, cache, meta, 0.125)
    finally:
        prefill._flash = real
    assert nmse(out, reference(q, cache, meta, 0.125)) < 1e-10


@pytest.mark.parametrize("scheme", ["int8", "int4", "int4_g32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_rows_are_bitwise_torchs_dequant(scheme, dtype):
    """The C dequantizer writes exactly (q.float() * scale).to(dtype), row block by row block."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    b = CpuAmxBackend()
    w = b.pack_weight(torch.randn(200, 1536, generator=torch.Generator().manual_seed(6)), scheme)
    _, kind, wp, sp, group, _, _ = b._plan(w)
    ref = quant.dequant_any(w, dtype)
    got = torch.full_like(ref, float("nan"))
    for n0, n1 in ((0, 7), (7, 150), (150, 200)):
        b.lib.hs_dequant_rows(wp, kind, sp, group, 1536, n0, n1, got[n0:].data_ptr(), int(dtype == torch.bfloat16))
    assert torch.equal(got, ref)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_large_m_quantized_linear_in_row_tiles(monkeypatch, scheme):
    """Prefill-size M: tiles of dequantized rows through the GEMM equal one GEMM on the whole
    dequantized weight (to the GEMM's own rounding), bias included, for several tile sizes."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    b = CpuAmxBackend()
    g = torch.Generator().manual_seed(7)
    w = b.pack_weight(torch.randn(300, 256, generator=g) * 0.05, scheme)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    bias = torch.randn(300, generator=g).to(torch.bfloat16)
    ref = (x.double() @ quant.dequant_any(w, torch.bfloat16).double().T + bias.double())
    for tile in (1 << 30, 64 * 256 * 2, 128 * 256 * 2):
        monkeypatch.setattr(quant, "TILE_BYTES", tile)
        y = b.linear(x, w, bias)
        assert y.shape == (64, 300) and y.dtype == torch.bfloat16
        assert nmse(y, ref) < 3e-5, tile


@pytest.mark.parametrize("preset", ["llama", "mistral"])
def test_long_prompt_greedy_matches_transformers_float32(checkpoint, preset):
    """An 80-token prompt prefilled in two chunks of 40 (the second after a cached prefix: a
    bottom-right causal mask; mistral adds a 32-token sliding window), both through the flash
    path, then greedy decode: logits within 1e-4 of HF transformers (float32), same tokens."""
    from halserve.hal.cpu_amx.backend import CpuAmxBackend
    from halserve.models.loader import load_model
    from tests.models.test_models import hf_logits, prompt, run_greedy

    path = checkpoint(preset)
    b = CpuAmxBackend()
    model, cfg = load_model(path, b)
    ids = prompt(80)
    calls = []
    real = prefill._flash
    try:
        prefill._flash = lambda *a: calls.append(a[0].shape[0]) or real(*a)
        ours, generated = run_greedy(model, cfg, b, ids, 12, chunks=[40, 40])
    finally:
        prefill._flash = real
    assert calls == [40] * (2 * cfg.num_layers)
    ref = hf_logits(path, ids + generated)[:-1]
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    assert ref[79:].argmax(-1).tolist() == generated


def test_int8_moe_model_runs_fused_experts_and_tracks_float(checkpoint, monkeypatch):
    """Qwen3-MoE with int8 experts: decode-size steps take the fused C kernel with int8
    weights (hs_moe_small kind 2), the prompt the per-expert path (row-tiled int8 GEMMs);
    the logits stay close to the float model's."""
    from halserve.hal.cpu_amx import backend as B
    from halserve.models.loader import load_model
    from tests.models.test_models import prompt, run_greedy

    path = checkpoint("qwen3_moe")
    b = B.CpuAmxBackend()
    ids = prompt(40)
    ref, gen = run_greedy(*load_model(path, b), b, ids, 4)
    kinds = []
    real = B.CpuAmxBackend._moe_small
    monkeypatch.setattr(B.CpuAmxBackend, "_moe_small", lambda self, *a: kinds.append(a[5]) or real(self, *a))
    model, cfg = load_model(path, b, quantization="int8")
    # the same tokens as the float run, the last four one at a time (decode-size MoE calls)
    ours, _ = run_greedy(model, cfg, b, ids + gen, 0, chunks=[len(ids), 1, 1, 1, 1])
    assert kinds and set(kinds) == {2}  # the int8 fused kernel ran
    assert ours.shape == ref.shape
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() > 0.99, cos

"""The cuda backend on a real GPU: HF parity (float32 token-exact, bf16 within a logits NMSE
bound), batch invariance (bitwise logits alone vs in mixed batches of 1..64), CUDA graph
decode, FP8 paths. Marked ``gpu`` by tests/gpu/conftest.py; skipped without CUDA."""
from __future__ import annotations

import os
import random

import pytest
import torch

from halserve.hal.interface import AttentionMetadata
from tests.helpers.checkpoints import PRESETS

DEV = os.environ.get("HALSERVE_GPU_TEST_DEVICE", "cuda")  # "cpu" + TRITON_INTERPRET=1 to debug
BS = 16


def _prompt(n: int, seed: int, vocab: int = 512) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, vocab, (n,), generator=g).tolist()


def _meta(seqs: list[tuple[list[int], int, int]], window=None) -> AttentionMetadata:
    """seqs: (block_table, context_len, query_len), queries laid out in order."""
    slots, cu = [], [0]
    for table, ctx, q in seqs:
        slots += [table[p // BS] * BS + p % BS for p in range(ctx - q, ctx)]
        cu.append(cu[-1] + q)
    width = max(len(t) for t, _, _ in seqs)
    t = lambda v, dt: torch.tensor(v, dtype=dt, device=DEV)  # noqa: E731
    return AttentionMetadata(
        cu_seqlens_q=t(cu, torch.int32), seq_lens=t([c for _, c, _ in seqs], torch.int32),
        block_tables=t([b + [0] * (width - len(b)) for b, _, _ in seqs], torch.int32),
        slot_mapping=t(slots, torch.int64), max_seqlen_q=max(q for *_, q in seqs),
        max_seqlen_k=max(c for _, c, _ in seqs), query_lens_host=[q for *_, q in seqs],
        seq_lens_host=[c for _, c, _ in seqs], block_size=BS, sliding_window=window)


def _caches(hal, cfg, num_blocks):
    shape = hal.kv_cache_shape(num_blocks, BS, cfg.num_kv_heads, cfg.head_dim)
    return [torch.zeros(shape, dtype=cfg.dtype, device=DEV) for _ in range(cfg.num_layers)]


@torch.inference_mode()
def _greedy(model, cfg, hal, ids, steps, chunks=None):
    caches = _caches(hal, cfg, 16)
    table = [9, 2, 7, 0, 4, 11, 13, 15]
    logits, done = [], 0
    for n in chunks or [len(ids)]:
        meta = _meta([(table, done + n, n)], cfg.sliding_window)
        h = model.forward(torch.tensor(ids[done:done + n], device=DEV), torch.arange(done, done + n, device=DEV),
                          caches, meta)
        logits.append(model.compute_logits(h).float())
        done += n
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        p = len(tokens) - 1
        meta = _meta([(table, p + 1, 1)], cfg.sliding_window)
        h = model.forward(torch.tensor(tokens[-1:], device=DEV), torch.tensor([p], device=DEV), caches, meta)
        logits.append(model.compute_logits(h).float())
    return torch.cat(logits)[:-1], tokens[len(ids):]


def _hf_logits(path, tokens, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").to(DEV).eval()
    with torch.no_grad():
        return m(torch.tensor([tokens], device=DEV)).logits[0].float()


def _nmse(a, b) -> float:
    a, b = a.double(), b.double()
    return (((a - b) ** 2).sum() / (b ** 2).sum()).item()


def _load(path, dtype, **kw):
    from halserve.hal.cuda import CudaBackend
    from halserve.models.loader import load_model

    hal = CudaBackend(DEV, batch_invariant=kw.pop("batch_invariant", False))
    model, cfg = load_model(path, hal, dtype=dtype, **kw)
    return hal, model, cfg


@pytest.mark.parametrize("preset", list(PRESETS))
def test_hf_parity_float32(checkpoint, preset):
    """float32: same greedy tokens as HF on the GPU, logits within 1e-4."""
    path = checkpoint(preset)
    hal, model, cfg = _load(path, "float32")
    ids = _prompt(20, 0)
    ours, gen = _greedy(model, cfg, hal, ids, 40, chunks=[7, 13])
    ref = _hf_logits(path, ids + gen, torch.float32)[:-1]
    assert ref[19:].argmax(-1).tolist() == gen
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["llama", "qwen3", "qwen3_moe", "mistral"])
def test_hf_parity_bfloat16(checkpoint, preset):
    """bf16: logits NMSE vs HF float32 no worse than 4x HF's own bf16 error (floor 1e-3)."""
    path = checkpoint(preset)
    hal, model, cfg = _load(path, "bfloat16")
    ids = _prompt(24, 1)
    ours, gen = _greedy(model, cfg, hal, ids, 16)
    ref32 = _hf_logits(path, ids + gen, torch.float32)[:-1]
    ref16 = _hf_logits(path, ids + gen, torch.bfloat16)[:-1]
    bound = max(4 * _nmse(ref16, ref32), 1e-3)
    assert _nmse(ours, ref32) < bound, (_nmse(ours, ref32), _nmse(ref16, ref32))


def test_fp8_quantization_close(checkpoint):
    path = checkpoint("llama")
    hal, model, cfg = _load(path, "bfloat16", quantization="fp8")
    ids = _prompt(24, 2)
    ours, gen = _greedy(model, cfg, hal, ids, 8)
    ref = _hf_logits(path, ids + gen, torch.float32)[:-1]
    assert _nmse(ours, ref) < 2e-2


def test_fp8_scaled_mm_and_triton_agree():
    from halserve.hal.cuda import CudaBackend
    from halserve.hal.cuda.backend import _scaled_mm
    from halserve.hal.triton import matmul as mm

    hal = CudaBackend(DEV)
    for m in (1, 16, 300):
        x = torch.randn(m, 512, device=DEV, dtype=torch.bfloat16)
        for scheme in ("fp8", "fp8_per_tensor"):
            w = hal.pack_weight(torch.randn(384, 512, device=DEV, dtype=torch.bfloat16), scheme)
            xq, xs = (mm.quant_fp8_per_token if w.act_scheme == "per_token" else mm.quant_fp8_per_tensor)(x)
            a = _scaled_mm(xq, xs, w, torch.bfloat16, None)
            b = mm.fp8_matmul(xq, xs, w.weight, w.scale, torch.bfloat16)
            assert _nmse(b, a) < 1e-5
            if m <= 16:  # decode path: quantization fused into the GEMM, same numbers
                c = mm.fp8_matmul_fused_quant(x, w.act_scheme == "per_token", w.weight, w.scale)
                assert _nmse(c, a) < 1e-5


def _batch_invariance(model, cfg, hal, ours_ids, steps, sizes, seed=0):
    """Our sequence's logits alone and inside mixed batches (other prefills and decodes)."""
    rng = random.Random(seed)
    nblocks = 64 * 8 + 16
    caches = _caches(hal, cfg, nblocks)
    for c in caches:
        c.normal_()  # other sequences read garbage KV: must not leak into ours
    our_table = list(range(8))
    results = {}
    for n in sizes:
        logits, tokens = [], list(ours_ids)
        ctx = 0
        for step in range(steps + 1):
            q = len(ours_ids) if step == 0 else 1
            ctx += q
            others = []
            for j in range(n - 1):
                table = list(range(16 + 8 * j, 16 + 8 * j + 8))
                oc = rng.randint(1, 100)
                oq = rng.choice([1, 1, oc]) if oc <= 100 else 1
                others.append((table, oc, min(oq, oc)))
            pos = rng.randint(0, len(others))
            seqs = others[:pos] + [(our_table, ctx, q)] + others[pos:]
            ids, positions = [], []
            for (t, c, qq), is_ours in zip(seqs, [k == pos for k in range(len(seqs))]):
                ids += tokens[ctx - q:ctx] if is_ours else [rng.randint(5, cfg.vocab_size - 1) for _ in range(qq)]
                positions += list(range(c - qq, c))
            meta = _meta(seqs)
            with torch.inference_mode():
                h = model.forward(torch.tensor(ids, device=DEV), torch.tensor(positions, device=DEV), caches, meta)
                last = sum(qq for _, _, qq in seqs[:pos + 1]) - 1
                lg = model.compute_logits(h[last:last + 1]).float()[0]
            logits.append(lg)
            tokens.append(int(lg.argmax()))
        results[n] = (torch.stack(logits), tokens[len(ours_ids):])
    return results


def test_batch_invariant_logits_bitwise(checkpoint):
    path = checkpoint("qwen3", dtype="bfloat16")
    hal, model, cfg = _load(path, "bfloat16", batch_invariant=True)
    res = _batch_invariance(model, cfg, hal, _prompt(37, 3), 12, [1, 2, 3, 8, 17, 32, 64])
    alone_logits, alone_tokens = res[1]
    for n, (lg, toks) in res.items():
        assert torch.equal(lg, alone_logits), f"batch of {n}: max diff {(lg - alone_logits).abs().max()}"
        assert toks == alone_tokens


def test_batch_invariant_greedy_through_engine(checkpoint):
    from halserve.engine.llm import LLM
    from halserve.engine.sampling import SamplingParams

    path = checkpoint("llama", dtype="bfloat16")
    llm = LLM(str(path), backend="cuda", batch_invariant=True, kv_cache_memory=256 << 20, max_num_seqs=64)
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    target = {"prompt_token_ids": _prompt(30, 4)}
    alone = llm.generate([target], sp)[0].outputs[0].token_ids
    for n in (5, 64):
        batch = [{"prompt_token_ids": _prompt(5 + 7 * i % 90, 100 + i)} for i in range(n - 1)]
        batch.insert(n // 2, target)
        out = llm.generate(batch, sp)
        assert out[n // 2].outputs[0].token_ids == alone


def test_cuda_graph_decode_matches_eager(checkpoint):
    path = checkpoint("qwen3", dtype="bfloat16")
    hal, model, cfg = _load(path, "bfloat16")
    caches = _caches(hal, cfg, 64)
    for c in caches:
        c.normal_()
    bucket, real = 8, 5
    tables = [list(range(4 * i, 4 * i + 4)) for i in range(bucket)]
    ctx = [10, 33, 17, 50, 2]
    seqs = [(tables[i], ctx[i], 1) for i in range(real)] + [(tables[i], 0, 1) for i in range(real, bucket)]
    meta = _meta([(t, max(c, 1), 1) for t, c, _ in seqs])
    meta.seq_lens[real:] = 0  # padding rows: no context, slot -1
    meta.slot_mapping[real:] = -1
    ids = torch.randint(5, 500, (bucket,), device=DEV)
    pos = (meta.seq_lens.to(torch.int64) - 1).clamp(min=0)

    def step():
        return model.compute_logits(model.forward(ids, pos, caches, meta))

    with torch.inference_mode():
        snapshot = [c.clone() for c in caches]
        eager = step().float()
        for c, s in zip(caches, snapshot):
            c.copy_(s)
        g = hal.capture_graph(step)
        for c, s in zip(caches, snapshot):
            c.copy_(s)
        got = g.replay().float()
    torch.testing.assert_close(got[:real], eager[:real], atol=1e-2, rtol=0)
    assert not torch.isnan(got).any()


def test_pin_host_failure_leaves_cuda_usable():
    """A failed ``pin_host`` (here: the memory is registered already) raises, and leaves no
    CUDA error behind for torch's next kernel launch to report as its own."""
    from halserve.hal import create

    hal = create("cuda")
    t = torch.empty(1 << 20, dtype=torch.uint8)
    unpin = hal.pin_host(t)
    try:
        with pytest.raises(RuntimeError, match="cudaHostRegister"):
            hal.pin_host(t)
        x = torch.arange(8, device="cuda", dtype=torch.float32)
        assert (x * 2).sum().item() == 56.0
        torch.cuda.synchronize()
    finally:
        unpin()

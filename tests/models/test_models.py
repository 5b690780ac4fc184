"""Every model family against HF transformers (float32) on the same tiny checkpoint: prefill
logits, then greedy decode through the paged KV cache with hand-built attention metadata."""
from __future__ import annotations

import logging

import pytest
import torch

from halserve.hal.interface import AttentionMetadata
from halserve.hal.native import NativeBackend
from halserve.models.loader import load_model
from tests.helpers.checkpoints import PRESETS

BLOCK_SIZE = 16
NUM_BLOCKS = 12
BLOCK_TABLE = [9, 2, 7, 0, 4, 11]  # scattered on purpose: 96 tokens of room
PROMPT_LEN = 20
DECODE_STEPS = 40
ATOL = 1e-4


def prompt(n: int = PROMPT_LEN, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 512, (n,), generator=g).tolist()


def metadata(seqs: list[tuple[list[int], int, int]], sliding_window=None) -> AttentionMetadata:
    """seqs: (block_table, context_len, query_len) per sequence, queries laid out in order."""
    slots, cu = [], [0]
    for table, ctx, q in seqs:
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(ctx - q, ctx)]
        cu.append(cu[-1] + q)
    width = max(len(t) for t, _, _ in seqs)
    tables = [t + [0] * (width - len(t)) for t, _, _ in seqs]
    return AttentionMetadata(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([c for _, c, _ in seqs], dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_seqlen_q=max(q for _, _, q in seqs), max_seqlen_k=max(c for _, c, _ in seqs),
        query_lens_host=[q for _, _, q in seqs], seq_lens_host=[c for _, c, _ in seqs],
        block_size=BLOCK_SIZE, num_decode_seqs=0, sliding_window=sliding_window,
    )


def kv_caches(hal, cfg, dtype):
    shape = hal.kv_cache_shape(NUM_BLOCKS, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return [torch.zeros(shape, dtype=dtype) for _ in range(cfg.num_layers)]


@torch.inference_mode()
def run_greedy(model, cfg, hal, ids: list[int], steps: int, chunks=None):
    """Prefill ``ids`` (in ``chunks`` if given), then ``steps`` greedy decode steps.
    Returns (logits of every position [len+steps-1, V], generated tokens)."""
    caches = kv_caches(hal, cfg, cfg.dtype)
    logits, done = [], 0
    for n in chunks or [len(ids)]:
        meta = metadata([(BLOCK_TABLE, done + n, n)], cfg.sliding_window)
        h = model.forward(torch.tensor(ids[done:done + n]), torch.arange(done, done + n), caches, meta)
        logits.append(model.compute_logits(h))
        done += n
    tokens = list(ids)
    for _ in range(steps):
        tokens.append(int(logits[-1][-1].argmax()))
        p = len(tokens) - 1
        meta = metadata([(BLOCK_TABLE, p + 1, 1)], cfg.sliding_window)
        h = model.forward(torch.tensor(tokens[-1:]), torch.tensor([p]), caches, meta)
        logits.append(model.compute_logits(h))
    return torch.cat(logits)[:-1], tokens[len(ids):]


def hf_logits(path, tokens: list[int], dtype=torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_matches_transformers(checkpoint, preset, caplog):
    path = checkpoint(preset)
    hal = NativeBackend()
    with caplog.at_level(logging.WARNING, logger="halserve.models.loader"):
        model, cfg = load_model(path, hal)
    assert not caplog.records, "loader left checkpoint tensors unused"
    assert cfg.dtype == torch.float32 and cfg.architecture == PRESETS[preset][0]
    if preset == "mistral":  # the window (32) is shorter than prompt + decode (60)
        assert cfg.sliding_window == 32

    ids = prompt()
    ours, generated = run_greedy(model, cfg, hal, ids, DECODE_STEPS)
    ref = hf_logits(path, ids + generated)[:-1]
    assert ours.dtype == torch.float32 and ours.shape == ref.shape == (PROMPT_LEN + DECODE_STEPS - 1, 512)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    # teacher-forced HF argmax at every decode position == HF greedy decoding of the prompt
    assert ref[PROMPT_LEN - 1:].argmax(-1).tolist() == generated
    assert len(set(generated)) > 1, "degenerate checkpoint: greedy repeats one token"


def test_chunked_prefill_and_batch_match_single(checkpoint):
    path = checkpoint("qwen3")
    hal = NativeBackend()
    model, cfg = load_model(path, hal)
    ids = prompt()
    whole, _ = run_greedy(model, cfg, hal, ids, 4)
    chunked, _ = run_greedy(model, cfg, hal, ids, 4, chunks=[7, 9, 4])
    torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=0)

    # one batch: sequence A decodes its 21st token while B prefills 12 tokens
    other, table_b = prompt(12, seed=1), [1, 3]
    caches = kv_caches(hal, cfg, cfg.dtype)
    with torch.inference_mode():
        meta = metadata([(BLOCK_TABLE, PROMPT_LEN, PROMPT_LEN)])
        model.forward(torch.tensor(ids), torch.arange(PROMPT_LEN), caches, meta)
        nxt = int(whole[PROMPT_LEN - 1].argmax())
        meta = metadata([(BLOCK_TABLE, PROMPT_LEN + 1, 1), (table_b, 12, 12)])
        h = model.forward(torch.tensor([nxt] + other), torch.tensor([PROMPT_LEN] + list(range(12))), caches, meta)
        batched = model.compute_logits(h)
    torch.testing.assert_close(batched[0], whole[PROMPT_LEN], atol=ATOL, rtol=0)
    torch.testing.assert_close(batched[1:], hf_logits(path, other), atol=ATOL, rtol=0)


def test_sharded_checkpoint_loads(checkpoint):
    path = checkpoint("llama", max_shard_size="50KB")
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert (path / "model.safetensors.index.json").is_file() and len(files) > 3
    hal = NativeBackend()
    model, cfg = load_model(path, hal)
    ours, _ = run_greedy(model, cfg, hal, prompt(), 0)
    torch.testing.assert_close(ours, hf_logits(path, prompt())[:-1], atol=ATOL, rtol=0)


def test_bfloat16_checkpoint_stays_bfloat16(checkpoint):
    path = checkpoint("qwen3", dtype="bfloat16")
    hal = NativeBackend()
    model, cfg = load_model(path, hal)
    assert cfg.dtype == torch.bfloat16
    assert model.layers[0].self_attn.qkv.weight.weight.dtype == torch.bfloat16
    ids = prompt()
    ours, _ = run_greedy(model, cfg, hal, ids, 0)
    ref = hf_logits(path, ids, dtype=torch.bfloat16)[:-1]
    assert (ours - ref).abs().max() < 0.1 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_dtype_override_and_quantization(checkpoint):
    path = checkpoint("qwen3_moe")
    hal = NativeBackend()
    model, cfg = load_model(path, hal, dtype="bfloat16")
    assert cfg.dtype == torch.bfloat16 and model.embed_tokens.weight.dtype == torch.bfloat16
    ids = prompt()
    ref, _ = run_greedy(*load_model(path, hal), hal, ids, 0)
    for scheme in hal.capabilities.quant_schemes:
        if scheme == "none":
            continue
        model, cfg = load_model(path, hal, quantization=scheme)
        assert model.layers[0].self_attn.qkv.weight.scheme == scheme
        assert model.layers[1].mlp.w13.scheme == scheme and model.layers[0].mlp.gate_up.weight.scheme == scheme
        ours, _ = run_greedy(model, cfg, hal, ids, 0)
        cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
        # a quantized router can flip an expert choice on a random MoE: allow the odd position
        assert cos.mean() > 0.99 and cos.min() > 0.9, (scheme, cos)

"""`halserve bench cpu`'s own logic (no timing): its random checkpoints are the models they
claim to be, llama-batched-bench gets a context it accepts, and each ratio in the table is
taken against the right peer."""
from __future__ import annotations

import argparse

import pytest

from halserve.bench.cpu import SHAPES, add_arguments
from halserve.bench.cpu_ckpt import llama_tensors, write_random
from halserve.bench.cpu_peer import batched_ctx
from halserve.bench.cpu_table import cpu_tables

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=96, vocab_size=300, max_position_embeddings=128)


@pytest.mark.parametrize("moe", [False, True])
def test_random_checkpoint_is_the_shape_it_names(tmp_path, moe):
    import torch
    from transformers import AutoModelForCausalLM

    from halserve import LLM
    from halserve.bench.latency import weight_bytes_per_token

    shape = dict(TINY, head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                 qk_norm=True) if moe else TINY
    path = write_random(tmp_path / "m", shape)
    hf, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf).__name__ == ("Qwen3MoeForCausalLM" if moe else "LlamaForCausalLM")
    n_hf = sum(p.numel() for p in hf.parameters())
    assert n_hf == sum(torch.Size(s).numel() for s in llama_tensors(**shape).values())
    # halserve loads it and counts only the routed experts' bytes per decode token
    llm = LLM(str(path), backend="native", dtype="bfloat16", max_model_len=64, enable_prefix_caching=False)
    emb = hf.get_input_embeddings().weight.numel()
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    active = n_hf - emb - experts + experts * 2 // 8
    assert weight_bytes_per_token(llm.engine.model) == 2 * active


@pytest.mark.parametrize("npls,npp,ntg", [([16, 64], 128, 32), ([16], 128, 32), ([3, 7], 100, 13), ([32], 128, 64)])
def test_batched_ctx_fits_and_divides(npls, npp, ntg):
    ctx = batched_ctx(npls, npp, ntg)
    for n in npls:
        assert ctx % n == 0 and ctx // max(npls) >= npp + ntg


def _args(**kw):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def _cells(text: str, engine: str, weights: str) -> list[str]:
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [engine, weights]:
            return cells
    raise AssertionError(f"no row {engine} {weights} in\n{text}")


def test_table_ratios_use_the_same_bit_width_peer():
    rows = [
        {"engine": "halserve cpu_amx", "quant": "none", "bits": 16, "weight_bytes": 2e9, "decode_tok_s": 40.0,
         "ttft_s": 0.5, "batch": {16: 600.0}},
        {"engine": "halserve cpu_amx", "quant": "int8", "bits": 8, "weight_bytes": 1e9, "decode_tok_s": 60.0,
         "ttft_s": 2.0, "batch": {}},
        {"engine": "halserve cpu_amx", "quant": "int4", "error": "RuntimeError: boom"},
        {"engine": "HF transformers", "quant": "none", "bits": 16, "weight_bytes": 5e9, "decode_tok_s": 20.0,
         "ttft_s": 1.0, "batch": {16: 200.0}},
        {"engine": "llama.cpp", "quant": "bf16", "bits": 16, "weight_bytes": 2e9, "decode_tok_s": 50.0,
         "ttft_s": 1.5, "repack": True, "batch": {16: 300.0}},
        {"engine": "llama.cpp", "quant": "q8_0", "bits": 8, "weight_bytes": 1.1e9, "decode_tok_s": 30.0,
         "ttft_s": 3.0, "repack": False, "batch": {}},
    ]
    text = cpu_tables(rows, 100.0, _args(ttft_len=1024, batch="16"), "head")
    bf16 = _cells(text, "halserve cpu_amx", "bf16")
    # tok/s, GB/s (2 GB x 40), % of 100 GB/s, x llama.cpp BF16, x HF, TTFT, llama.cpp TTFT / ours,
    # HF TTFT / ours
    assert bf16[2:] == ["40.00", "80.0", "80%", "0.80", "2.00", "0.500", "3.00", "2.00"]
    int8 = _cells(text, "halserve cpu_amx", "int8")
    assert int8[5] == "2.00" and int8[8] == "1.50" and int8[9] == "0.50"  # against Q8_0, not BF16; HF's bf16
    assert _cells(text, "halserve cpu_amx", "int4")[2] == "error: RuntimeError: boom"
    assert _cells(text, "HF transformers", "bf16")[3] == "40.0"  # HF read at our bytes, not its own
    assert _cells(text, "llama.cpp", "Q8_0 (no repack)")[5] == "-"
    batched = text.split("Batched decode")[1]
    assert _cells(batched, "halserve cpu_amx", "bf16")[2:5] == ["600.0", "3.00", "2.00"]


def test_shape_overrides_refuse_what_does_not_apply():
    from halserve.bench import cpu

    with pytest.raises(SystemExit, match="--experts does not apply to --shape 8b"):
        cpu._checkpoint(_args(shape="8b", experts=8))
    assert SHAPES["qwen3-moe"]["num_experts_per_tok"] == 8


def test_batched_sequences_decode_in_lockstep(tmp_path):
    """The batched figure is n sequences decoding together, as HF's generate runs them: all
    prompts prefill in one step, so each of the k - 1 timed steps decodes all n (with the
    engine's default 2048-token budget, 5 x 500 prompt tokens would start one sequence a
    step late and end the timed steps on a 1-row step)."""
    from halserve.bench.cpu import run_halserve

    path = write_random(tmp_path / "m", dict(TINY, max_position_embeddings=1024))
    args = _args(batch="5", input_len=4, output_len=3, batch_input_len=500, batch_output_len=4,
                 batch_mode="sequential")
    row = {"batch": {}}
    run_halserve(path, "native", "none", args, row)
    assert row["batch_rows"] == {5: "3 steps of 5-5 rows"} and row["batch"][5] > 0 and row["batch_mean"][5] > 0


def test_interleaved_batched_steps_every_engine_in_turn(tmp_path):
    """--batch-mode interleaved (the default): the batch-1 runs leave the batched figures out,
    then every engine (halserve rows and HF) is stepped in turn, k - 1 timed steps each."""
    from halserve.bench.cpu import run_batched_interleaved, run_halserve, run_hf

    path = write_random(tmp_path / "m", dict(TINY, max_position_embeddings=1024))
    args = _args(batch="3", input_len=4, output_len=3, batch_input_len=40, batch_output_len=5)
    rows = [{"engine": "halserve native", "quant": "none", "batch": {}},
            {"engine": "HF transformers", "quant": "none", "batch": {}}]
    run_halserve(path, "native", "none", args, rows[0])
    run_hf(path, args, rows[1])
    assert rows[0]["batch"] == {} and rows[1]["batch"] == {}
    run_batched_interleaved(path, args, rows)
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["batch"][3] > 0 and len(r["batch_step_ms"][3]) == 4


@pytest.mark.parametrize("batch_quants,late", [("none", False), ("none,int8", True)])
def test_interleaved_batch_sees_every_row_that_runs_batched(tmp_path, monkeypatch, batch_quants, late):
    """--batch-quants int8 in the default interleaved mode: the int8 row (run after the 16-bit
    rows and the peers) must exist when the engines are stepped together, or its batched figure
    is silently missing; with 16-bit only, the batched figures come before the quantized rows."""
    from halserve.bench import cpu, cpu_table

    path = write_random(tmp_path / "m", TINY)
    order, seen = [], []
    monkeypatch.setattr(cpu, "read_bandwidth_gbs", lambda *a, **k: 10.0)
    monkeypatch.setattr(cpu, "run_halserve", lambda m, b, q, a, row: order.append(f"{b} {q}"))
    monkeypatch.setattr(cpu, "run_batched_interleaved", lambda m, a, rows: (
        order.append("batched"), seen.append({(r["engine"], r["quant"]) for r in rows})))
    monkeypatch.setattr(cpu_table, "cpu_tables", lambda *a, **k: "")
    args = _args(model=path, backends="cpu_amx", quant="none,int8", batch="2", batch_quants=batch_quants)
    args.no_hf = True
    assert cpu.main(args) == 0
    assert len(seen) == 1 and ("halserve cpu_amx", "none") in seen[0]
    assert (("halserve cpu_amx", "int8") in seen[0]) == late
    want = ["cpu_amx none", "cpu_amx int8", "batched"] if late else ["cpu_amx none", "batched", "cpu_amx int8"]
    assert order == want

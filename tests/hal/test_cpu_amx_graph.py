"""cpu_amx decode graphs (graph.py): a captured step replays bit for bit what the step function
computes eagerly on the same inputs, through the engine (greedy and seeded sampling, batch
buckets with padding rows, prefix hits, preemption, fp32 / bf16 / int8 weights), and capture
refuses steps that read host values."""
from __future__ import annotations

import pytest
import torch

from halserve import LLM, SamplingParams
from halserve.hal.cpu_amx import graph
from tests.hal.test_cpu_amx import pytestmark  # noqa: F401 (its skip mark: an x86-64 CPU with AVX2 and FMA)

PROMPTS = [[5, 17, 42], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1]]


def _params() -> list[SamplingParams]:
    """Greedy with logprobs (the logits' bits show in them), seeded sampling, and lengths
    that finish at different steps, so decode walks down the buckets 8 (3 padding rows), 4, 2, 1."""
    return [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=3) for n in (4, 7, 10)] + [
        # penalties and a bias edit the logits a replay returns (its reused output buffer)
        SamplingParams(temperature=0.0, max_tokens=13, ignore_eos=True, logprobs=3, repetition_penalty=1.3,
                       presence_penalty=0.5, logit_bias={7: 2.0}),
        SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=11, max_tokens=16, ignore_eos=True, logprobs=3)]


def _outs(llm: LLM, prompts=PROMPTS):
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, _params())]


@pytest.fixture
def replays(monkeypatch):
    count = [0]
    orig = graph.CpuGraph.replay

    def counted(self):
        count[0] += 1
        return orig(self)

    monkeypatch.setattr(graph.CpuGraph, "replay", counted)
    return count


@pytest.mark.parametrize("preset,dtype,quant,bi", [
    ("llama", "float32", None, False), ("llama", "bfloat16", None, False), ("llama", "bfloat16", "int8", False),
    ("llama", "bfloat16", "int4", False), ("llama", "float32", "int8_w8a8", False), ("llama", "float32", None, True),
    ("mixtral", "bfloat16", None, False)])
def test_engine_graphs_match_eager_bitwise(checkpoint, replays, preset, dtype, quant, bi):
    path = str(checkpoint(preset))
    kw = dict(backend="cpu_amx", dtype=dtype, quantization=quant, batch_invariant=bi, max_num_seqs=8)
    eager = LLM(path, enforce_eager=True, **kw)
    assert not eager.engine.runner.graphs
    g = LLM(path, **kw)
    assert g.engine.hal.capabilities.graphs and sorted(g.engine.runner.graphs) == [1, 2, 4, 8]
    one = g.engine.runner.graphs[1]
    # batch 1: the whole step one C call, the embedding and the logits' cast (none in float32:
    # .float() is then the tensor itself) included
    if preset == "llama":  # (MoE routing runs in torch)
        assert one.num_torch == (1 if dtype == "float32" else 2) and len(one.steps) == 1 and one.num_c >= 2 * 8
    ref = _outs(eager)
    before = replays[0]
    assert _outs(g) == ref
    assert replays[0] - before >= 12  # the decode steps replayed
    # again: prefix hits (a prefill after a cached prefix rounds differently from a whole one,
    # so against the eager engine's own second pass)
    assert _outs(g) == _outs(eager)


def test_graphs_survive_preemption(checkpoint, replays):
    path = str(checkpoint("llama"))
    kw = dict(backend="cpu_amx", dtype="float32", max_num_seqs=8, num_gpu_blocks_override=8,
              enable_prefix_caching=False)
    long = [list(range(10 + i, 40 + i)) for i in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    eager = LLM(path, enforce_eager=True, **kw)
    ref = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in eager.generate(long, sp)]
    g = LLM(path, **kw)
    before = replays[0]
    got = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in g.generate(long, sp)]
    assert g.get_metrics()["num_preemptions_total"] > 0 and replays[0] > before
    assert got == ref


def replays_match_step(llm: LLM) -> None:
    """Each captured decode bucket's replay against its own step function run eagerly on the
    same static inputs (new token ids and lengths; true host lengths for eager attention, the
    graph keeps max_model_len); one output buffer, rewritten."""
    r = llm.engine.runner
    st, nblk = r._static, r.num_blocks
    gen = torch.Generator().manual_seed(0)
    for b, gr in r.graphs.items():
        meta = r._decode_meta[b]
        pos = torch.randint(0, 60, (b,), generator=gen)
        st["ids"][:b] = torch.randint(0, 500, (b,), generator=gen)
        st["pos"][:b] = pos
        st["slots"][:b] = -1
        st["seq_lens"][:b] = (pos + 1).int()
        st["tables"][:b] = (torch.arange(st["tables"].shape[1]) % nblk).int()
        meta.seq_lens_host[:] = (pos + 1).tolist()
        out = gr.replay()
        got = out.clone()
        with torch.inference_mode():
            want = r.model.compute_logits(r.model.forward(st["ids"][:b], st["pos"][:b], r.kv_caches, meta))
        assert gr.replay() is out
        assert torch.equal(got, want), b


def test_replay_is_the_step_function_bitwise(checkpoint):
    replays_match_step(LLM(str(checkpoint("llama")), backend="cpu_amx", dtype="bfloat16", max_num_seqs=8))


def _cpu_amx():
    from halserve.hal.cpu_amx.backend import CpuAmxBackend

    return CpuAmxBackend()


def test_capture_replays_c_and_torch_ops_in_order():
    hal = _cpu_amx()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen)
    w = torch.randn(64, generator=gen)
    pw = hal.pack_weight(torch.randn(32, 64, generator=gen).bfloat16())
    emb = torch.randn(50, 8, generator=gen).bfloat16()
    ids = torch.tensor([3, 0, 49])

    def step():
        h = hal.rms_norm(x, w, 1e-5)
        h = h * 2.0 + x  # torch ops between kernels
        h.add_(0.5)  # an in-place one
        t = h.t().contiguous().t().contiguous()  # strided copies (graph.c's): inner stride 3, then 64
        y = hal.linear(t.bfloat16(), pw)  # float32 -> bfloat16 rounds: torch's
        e = torch.nn.functional.embedding(ids, emb)  # graph.c's gather
        e2 = emb.index_select(0, ids)  # the same
        return y.float(), e.float(), e2

    g = hal.capture_graph(step)
    assert g is not None and g.num_c == 2 and g.num_torch >= 8 and len(g.steps) >= 3
    out = g.replay()
    for _ in range(3):
        x.copy_(torch.randn(3, 64, generator=gen))
        ids.copy_(torch.randint(0, 50, (3,), generator=gen))
        assert g.replay() is out
        want = step()
        assert all(torch.equal(a, b) for a, b in zip(out, want))


def test_capture_refuses_host_reads():
    hal = _cpu_amx()
    x = torch.randn(4, 8)

    def step():
        n = int(x.abs().argmax())  # a host value: a replay would keep this one
        return x[:, :n + 1].sum(-1)

    assert hal.capture_graph(step) is None
    assert "aten.item" in hal.graph_refusal and "host value" in hal.graph_refusal


def test_decode_steps_only(checkpoint):
    """Queries longer than one token (prefill tails, speculative verify steps) are not
    captured: their flash path reads host lengths and their padding rows sit past the last
    sequence's query rows. Those steps run eagerly; greedy speculation still matches."""
    path = str(checkpoint("llama"))
    spec = {"method": "callable", "proposer": lambda ids: [ids[-1]] * 3, "num_speculative_tokens": 3}
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in LLM(path, backend="cpu_amx", dtype="bfloat16", enforce_eager=True,
                                                max_num_seqs=4).generate(PROMPTS[:3], sp)]
    g = LLM(path, backend="cpu_amx", dtype="bfloat16", max_num_seqs=4, speculative_config=spec)
    r = g.engine.runner
    assert sorted(r.graphs) == [1, 2, 4] and not r.tail_graphs and not r.verify.graphs
    assert "only decode steps" in g.engine.hal.graph_refusal
    assert [o.outputs[0].token_ids for o in g.generate(PROMPTS[:3], sp)] == ref


def test_switch(monkeypatch, checkpoint):
    monkeypatch.setenv(graph.ENV, "0")
    hal = _cpu_amx()
    assert not hal.capabilities.graphs and hal.capture_graph(lambda: torch.ones(1)) is None
    g = LLM(str(checkpoint("llama")), backend="cpu_amx", dtype="float32", max_num_seqs=2)
    assert not g.engine.runner.graphs
    monkeypatch.setenv(graph.ENV, "yes")
    with pytest.raises(ValueError, match="HALSERVE_CPU_GRAPHS='yes' is not valid"):
        _cpu_amx()


@pytest.fixture
def refusals(monkeypatch):
    """Every capture refusal's reason, in order (graph_refusal keeps only the last)."""
    got, orig = [], graph.capture

    def capture(backend, fn, args):
        g = orig(backend, fn, args)
        if g is None:
            got.append(backend.graph_refusal)
        return g

    monkeypatch.setattr(graph, "capture", capture)
    return got


def test_buckets_past_the_row_cap_run_eagerly(checkpoint, replays, refusals):
    """Decode buckets up to graph.GRAPH_MAX_ROWS rows are captured (the 32-, 48- and 64-row ones
    too, with padding rows), larger ones step eagerly; all give the eager tokens, and each
    bucket's replay is its step function's bits."""
    assert graph.GRAPH_MAX_ROWS == 64  # the goal's batch sizes (16, 64 sequences) replay
    path = str(checkpoint("llama"))
    sp = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    prompts = [[i + 3, i + 7, 11] for i in range(70)]
    eager = LLM(path, backend="cpu_amx", dtype="float32", max_num_seqs=80, enforce_eager=True)
    ref = [o.outputs[0].token_ids for o in eager.generate(prompts, sp)]
    g = LLM(path, backend="cpu_amx", dtype="float32", max_num_seqs=80)
    graphs = g.engine.runner.graphs
    assert sorted(graphs) == [1, 2, 4, 8, 16, 32, 48, 64]  # not 80
    assert "step of 80 rows runs eagerly: captured buckets go up to 64" in refusals[0]
    # what a bucket keeps is counted: its buffers grow with its rows
    assert 0 < graphs[16].nbytes < graphs[32].nbytes < graphs[64].nbytes
    before = replays[0]
    assert [o.outputs[0].token_ids for o in g.generate(prompts, sp)] == ref  # 70 rows: eager steps
    assert replays[0] == before
    assert [o.outputs[0].token_ids for o in g.generate(prompts[:40], sp)] == ref[:40]  # the 48-row graph
    assert replays[0] > before
    replays_match_step(g)


def test_big_buckets_refused_past_their_memory_budget(checkpoint, monkeypatch, refusals):
    """A bucket above GRAPH_FREE_ROWS rows whose buffers exceed GRAPH_BIG_BYTES runs eagerly,
    and the refusal names its size; smaller buckets are captured whatever their bytes."""
    monkeypatch.setattr(graph, "GRAPH_BIG_BYTES", 0)
    g = LLM(str(checkpoint("llama")), backend="cpu_amx", dtype="float32", max_num_seqs=64)
    assert sorted(g.engine.runner.graphs) == [1, 2, 4, 8, 16]
    assert [r.split(":")[0] for r in refusals[:3]] == [f"a step of {b} rows runs eagerly" for b in (64, 48, 32)]
    assert all("MiB of buffers resident" in r for r in refusals[:3])
    sp = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [[i + 3, 11] for i in range(30)]
    ref = LLM(str(checkpoint("llama")), backend="cpu_amx", dtype="float32", max_num_seqs=64, enforce_eager=True)
    assert [o.outputs[0].token_ids for o in g.generate(prompts, sp)] == \
        [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]

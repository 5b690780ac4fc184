"""The engine on the cuda backend: decode CUDA graphs give the same greedy tokens as eager
(and as native on the CPU), and KV blocks cached on the GPU load into a CPU server through
the filesystem tier. Marked ``gpu`` by tests/gpu/conftest.py; skipped without CUDA."""
from __future__ import annotations

import pytest

from halserve import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5, 9, 2, 6], list(range(100, 190))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("preset", ["llama", "qwen3", "mixtral"])
def test_graphs_match_eager_and_cpu(checkpoint, preset):
    path = str(checkpoint(preset))
    cpu = tokens(LLM(path, dtype="float32", backend="native").generate(PROMPTS, GREEDY))
    eager = LLM(path, dtype="float32", backend="cuda", enforce_eager=True, max_num_seqs=32)
    assert not eager.engine.runner.graphs
    graphs = LLM(path, dtype="float32", backend="cuda", max_num_seqs=32)
    assert sorted(graphs.engine.runner.graphs) == [1, 2, 4, 8, 16, 32]
    assert tokens(eager.generate(PROMPTS, GREEDY)) == cpu
    assert tokens(graphs.generate(PROMPTS, GREEDY)) == cpu
    assert tokens(graphs.generate(PROMPTS[1:2], GREEDY)) == cpu[1:2]
    assert sorted(graphs.engine.runner.tail_graphs) == [2, 4, 8, 16]


@pytest.mark.parametrize("preset", ["llama", "mixtral"])
def test_prefix_hit_tail_graphs_match_eager(checkpoint, tmp_path, preset):
    """The tail after a prefix hit (device cache or host offload tier) runs as a captured
    tail graph, with its split-KV attention; tokens equal eager and the CPU."""
    path = str(checkpoint(preset))
    long = list(range(20, 212))  # 12 full blocks; tails of 16, 3, 9 and 2 tokens below
    prompts = [long, long + [7, 8, 9], long[:160] + [5] * 9, long[:64] + [1, 2]]
    cpu_llm = LLM(path, dtype="float32", backend="native", enable_prefix_caching=False)
    cpu = [tokens(cpu_llm.generate([p], GREEDY))[0] for p in prompts]
    for eager in (True, False):
        llm = LLM(path, dtype="float32", backend="cuda", enforce_eager=eager, kv_offload_host_bytes=1 << 26)
        assert bool(llm.engine.runner.tail_graphs) is not eager
        assert [tokens(llm.generate([p], GREEDY))[0] for p in prompts] == cpu
        outs = [llm.generate([p], GREEDY)[0] for p in prompts]  # device prefix hits
        assert tokens(outs) == cpu and [o.num_cached_tokens for o in outs] == [176, 192, 160, 64]
        llm.engine.kv.reset_prefix_cache()  # the host tier serves them
        outs = [llm.generate([p], GREEDY)[0] for p in prompts]
        assert tokens(outs) == cpu and [o.num_cached_tokens for o in outs] == [176, 192, 160, 64]


def test_blocks_cached_on_gpu_load_on_cpu(checkpoint, tmp_path):
    path = str(checkpoint("llama"))
    prompt = [list(range(20, 120))]  # six full blocks
    gpu = LLM(path, dtype="float32", backend="cuda", kv_offload_dir=str(tmp_path))
    ref = tokens(gpu.generate(prompt, GREEDY))
    gpu.engine.connector.manager.flush()
    assert gpu.get_metrics()["offload"]["disk"]["stores"] >= 6
    cpu = LLM(path, dtype="float32", backend="native", kv_offload_dir=str(tmp_path))
    out = cpu.generate(prompt, GREEDY)
    assert out[0].num_cached_tokens == 96
    assert cpu.get_metrics()["offload"]["disk"]["hits"] == 6
    assert tokens(out) == ref

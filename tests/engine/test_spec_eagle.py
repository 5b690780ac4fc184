"""EAGLE draft heads: a head checkpoint built here (safetensors + a Llama config, the format
vLLM's EagleLlamaForCausalLM reads), greedy and seeded output identical with and without it,
the sampled distribution unchanged, the hidden-state plumbing exact, and acceptance high for
a head built to reproduce its target."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from halserve import LLM, AsyncLLM, SamplingParams
from tests.engine.test_spec_decode import PROMPTS, _chi2_pvalue, _spec_metrics, _tokens

GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def _target_tensors(target: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(target.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_head(path: Path, target: Path, kind: str, seed: int = 0, prefix: str = "") -> Path:
    """An EAGLE-1 head for ``target`` in ``path``. kind "random": random weights (with an fc
    bias, its own embedding and a second layer); "identity": fc passes the target's hidden
    state through and the layer adds nothing, so the head's logits are the target's at the
    position it reads; "copy": fc passes the token's embedding and the layer and final norm
    are the (one-layer) target's own, so the head recomputes the target's next hidden state."""
    cfg = json.loads((target / "config.json").read_text())
    h = cfg["hidden_size"]
    t = _target_tensors(target)
    g = torch.Generator().manual_seed(seed)
    layer = {k.removeprefix("model.layers.0."): v for k, v in t.items()
             if k.startswith("model.layers.0.") and "input_layernorm" not in k}
    eye, zero = torch.eye(h), torch.zeros(h, h)
    w: dict[str, torch.Tensor] = {}
    if kind == "random":
        layers = 2
        for i in range(layers):
            for k, v in layer.items():
                w[f"layers.{i}.{k}"] = torch.randn(v.shape, generator=g) * (0.1 if v.dim() == 2 else 0.05) + \
                    (1.0 if "norm" in k else 0.0)
        w["layers.1.input_layernorm.weight"] = torch.ones(h) + 0.05 * torch.randn(h, generator=g)
        w["fc.weight"] = torch.randn(h, 2 * h, generator=g) * 0.1
        w["fc.bias"] = torch.randn(h, generator=g) * 0.05
        w["embed_tokens.weight"] = torch.randn(cfg["vocab_size"], h, generator=g) * 0.1
    else:
        layers = 1
        w.update({f"layers.0.{k}": v.clone() for k, v in layer.items()})
        if kind == "identity":
            w["fc.weight"] = torch.cat([zero, eye], 1)
            w["layers.0.self_attn.o_proj.weight"].zero_()
            w["layers.0.mlp.down_proj.weight"].zero_()
        else:
            w["fc.weight"] = torch.cat([eye, zero], 1)
            w["norm.weight"] = t["model.norm.weight"].clone()
    cfg.update(architectures=["EagleLlamaForCausalLM"], num_hidden_layers=layers)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({prefix + k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"))
    return path


def copyable_target(src: Path, dst: Path) -> Path:
    """A one-layer target whose first norm is (numerically almost) the identity on its
    embeddings: unit input-norm weight and embedding rows of unit RMS. A head made with
    ``make_head(kind="copy")`` then computes what the target computes one position later,
    except that it never sees the first token."""
    import shutil

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        t = load_file(str(f))
        for k in t:
            if k.endswith("layers.0.input_layernorm.weight"):
                t[k] = torch.ones_like(t[k])
            if k.endswith("embed_tokens.weight"):
                # (the padding row is zero: it stays zero)
                t[k] = t[k] / t[k].pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        save_file(t, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def target(checkpoint):
    return checkpoint("llama")


def _eagle(head, k=3) -> dict:
    return {"method": "eagle", "model": str(head), "num_speculative_tokens": k}


def test_greedy_identical_with_a_random_head(target, tmp_path):
    ref = _tokens(LLM(str(target), dtype="float32", max_num_batched_tokens=64), PROMPTS, GREEDY)
    for prefix in ("", "model."):
        head = make_head(tmp_path / f"head{prefix}", target, "random", prefix=prefix)
        llm = LLM(str(target), dtype="float32", max_num_batched_tokens=64, speculative_config=_eagle(head, 4))
        assert _tokens(llm, PROMPTS, GREEDY) == ref
        assert _spec_metrics(llm)[0] > 0  # it drafted
        # where the backend captures graphs the target's steps run in them (they return the hidden states)
        assert bool(llm.engine.runner.graphs) == llm.engine.hal.capabilities.graphs


def test_hidden_states_reach_the_head_at_the_right_position(target, tmp_path):
    """With the identity head, draft 1 is argmax lm_head(h_{last-1}): the target's greedy
    token after position last-1, which is the last token itself; later drafts feed that
    state back and repeat it. Any off-by-one in which hidden row the head reads, or a row
    left over from a rejected draft, breaks the equality."""
    head = make_head(tmp_path / "head", target, "identity")
    llm = LLM(str(target), dtype="float32", max_num_batched_tokens=64, speculative_config=_eagle(head, 3))
    prop = llm.engine.proposer
    seen = []
    inner = prop.propose

    def spy(seqs, ks):
        out = inner(seqs, ks)
        seen.extend((s.token_ids[-1], d, min(k, 3)) for s, d, k in zip(seqs, out, ks))
        return out

    prop.propose = spy
    ref = _tokens(LLM(str(target), dtype="float32"), PROMPTS, GREEDY)
    assert _tokens(llm, PROMPTS, GREEDY) == ref
    assert len(seen) > 20
    assert all(d == [last] * k for last, d, k in seen), seen[:5]


def test_a_head_that_copies_its_target_is_accepted(checkpoint, tmp_path):
    one = copyable_target(checkpoint("llama", seed=5, num_hidden_layers=1), tmp_path / "target")
    ref = _tokens(LLM(str(one), dtype="float32"), PROMPTS, GREEDY)
    rates = {}
    for kind in ("copy", "random"):
        head = make_head(tmp_path / kind, one, kind)
        llm = LLM(str(one), dtype="float32", speculative_config=_eagle(head, 4))
        assert _tokens(llm, PROMPTS, GREEDY) == ref
        rates[kind] = llm.get_metrics()["spec_decode_acceptance_rate"]
    # the copy misses only the first token's attention share: most drafts are right; a random
    # head's agree by chance (about 1 in the vocabulary)
    assert rates["copy"] > 0.5 and rates["random"] < 0.1, rates


def test_head_kv_equals_one_pass_over_the_kept_tokens(target, tmp_path):
    """After prefill chunks, batched verify steps with rejections and drafts written past
    the kept tokens, the head's KV of every block it calls valid equals one pass of the head
    over the sequence's kept tokens with the target's hidden states (transformers)."""
    import transformers

    from halserve.engine.spec.draft_batch import DraftKV, DraftRow, draft_batch

    head = make_head(tmp_path / "head", target, "random")
    llm = LLM(str(target), dtype="float32", block_size=8, max_num_batched_tokens=16,
              enable_prefix_caching=False, speculative_config=_eagle(head, 3))
    eng, prop = llm.engine, llm.engine.proposer
    for rid, prompt in zip("abc", PROMPTS):
        eng.add_request(rid, prompt, GREEDY)
    for _ in range(14):
        eng.step()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    checked = 0
    for rid in "abc":
        if rid not in eng.requests:
            continue
        seq = eng.requests[rid].seqs[0]
        st = prop._state[seq.seq_id]
        assert st.origin == 0
        valid = st.valid
        with torch.no_grad():
            h = ref_model(torch.tensor([seq.token_ids]), output_hidden_states=True).hidden_states[-1][0]
        scratch = DraftKV(prop.kv.hal, prop.block_size, prop.head.num_layers, prop.head.num_kv_heads,
                          prop.head.head_dim, torch.float32, prop.device)
        scratch.allocate(prop.kv.cache.shape[2])
        pos, meta, _ = draft_batch([DraftRow(seq.block_ids, 0, valid)], prop.block_size, prop.device,
                                   prop.head.max_position_embeddings)
        with torch.inference_mode():
            # the reference ran on the CPU; the head lives on the engine's device
            prop.head.forward(torch.tensor(seq.token_ids[1:valid + 1], device=prop.device), pos,
                              h[:valid].to(prop.device), scratch.caches, meta)
        full = valid // prop.block_size
        assert full >= 2
        for b in seq.block_ids[:full]:
            torch.testing.assert_close(prop.kv.cache[:, :, b], scratch.cache[:, :, b], atol=1e-4, rtol=1e-4)
        checked += 1
    assert checked >= 2 and _spec_metrics(llm)[1] < _spec_metrics(llm)[0]


def test_seeded_and_sampled_output_unchanged(target, tmp_path):
    """Seeded requests draw the same tokens; unseeded ones follow the target's distribution:
    each second token (drawn in a verify step of the head's draft) against the target's
    distribution after the prompt and that sample's first token."""
    head = make_head(tmp_path / "head", target, "identity")
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=11, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=1.3, seed=5, max_tokens=20, repetition_penalty=1.3, min_tokens=10)]
    base = LLM(str(target), dtype="float32")
    # short prompts and a wide budget: every decode row gets room for its draft
    llm = LLM(str(target), dtype="float32", max_num_seqs=128, max_num_batched_tokens=4096, seed=3,
              speculative_config=_eagle(head, 2))
    assert _tokens(llm, PROMPTS[:2], params) == _tokens(base, PROMPTS[:2], params)
    prompt, n = PROMPTS[0], 800
    drafts0 = llm.get_metrics()["spec_decode_num_drafts"]
    outs = [o.outputs[0].token_ids for o in
            llm.generate([prompt] * n, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True))]
    assert llm.get_metrics()["spec_decode_num_drafts"] - drafts0 >= n  # second tokens came from verify steps
    # the target's whole distribution after prompt + each first token seen (transformers, float32)
    import transformers

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    firsts = sorted({o[0] for o in outs})
    with torch.no_grad():
        logits = ref_model(torch.tensor([prompt + [t] for t in firsts])).logits[:, -1].double()
    cond = dict(zip(firsts, torch.softmax(logits, -1)))
    # probability integral transform: u = F(t2 - 1) + V p(t2) is uniform iff t2 ~ p(. | t1)
    g = torch.Generator().manual_seed(0)
    us = []
    for o in outs:
        p = cond[o[0]]
        us.append(float(p[:o[1]].sum() + torch.rand((), generator=g, dtype=torch.float64) * p[o[1]]))
    counts = torch.histc(torch.tensor(us), bins=10, min=0.0, max=1.0)
    assert _chi2_pvalue(counts, torch.full((10,), 0.1)) > 1e-3
    # the identity head drafted the target's greedy token after the prompt (argmax of the
    # state at the prompt's end): it must be emitted as often as the target draws it (the
    # PIT alone barely sees a rule that over-accepts drafts: those land all over [0, 1])
    with torch.no_grad():
        draft = int(ref_model(torch.tensor([prompt])).logits[0, -1].argmax())
    p_draft = torch.stack([cond[o[0]][draft] for o in outs])
    hits = sum(o[1] == draft for o in outs)
    z = (hits - p_draft.sum()) / (p_draft * (1 - p_draft)).sum().sqrt()
    assert abs(float(z)) < 4, (hits, float(p_draft.sum()))


def test_prefix_cache_preemption_and_chunked_prefill(checkpoint, tmp_path):
    path = checkpoint("llama")
    head = make_head(tmp_path / "head", path, "identity")
    shared = list(range(40, 80))
    prompts = [shared + [i, i + 1] for i in range(6)] + PROMPTS
    kw = dict(dtype="float32", num_gpu_blocks_override=14, max_num_batched_tokens=24, block_size=8)
    ref = _tokens(LLM(str(path), **kw), prompts, GREEDY)
    llm = LLM(str(path), **kw, speculative_config=_eagle(head, 3))
    assert _tokens(llm, prompts, GREEDY) == ref
    m = llm.get_metrics()
    assert m["num_preemptions_total"] > 0 and m["prefix_cache_hits"] > 0 and m["spec_decode_num_drafts"] > 0
    assert llm.engine.proposer._state == {}  # nothing left behind


def test_async_llm(target, tmp_path):
    import asyncio

    head = make_head(tmp_path / "head", target, "random")
    ref = _tokens(LLM(str(target), dtype="float32"), PROMPTS[2:], GREEDY)
    allm = AsyncLLM(str(target), dtype="float32", speculative_config=_eagle(head, 3))

    async def run():
        last = None
        async for out in allm.generate(PROMPTS[2], GREEDY, request_id="a"):
            last = out
        return last.outputs[0].token_ids

    try:
        assert asyncio.run(run()) == ref[0]
        assert allm.get_metrics()["spec_decode_num_draft_tokens"] > 0
    finally:
        allm.shutdown()


@pytest.mark.parametrize("change, words", [
    (lambda d, w: w.pop("fc.weight"), ["fc.weight"]),
    (lambda d, w: w.update(extra=torch.zeros(2)), ["'extra'"]),
    (lambda d, w: d.update(hidden_size=32), ["hidden_size 32"]),
    (lambda d, w: d.update(architectures=["Eagle3LlamaForCausalLM"]), ["EAGLE-3"]),
    (lambda d, w: w.update({"fc.weight": torch.zeros(64, 64)}), ["fc.weight is [64, 64]", "[64, 128]"]),
    (lambda d, w: d.update(num_hidden_layers=0), ["num_hidden_layers=0"]),
])
def test_bad_head_is_a_clear_error(target, tmp_path, change, words):
    head = make_head(tmp_path / "head", target, "identity")
    cfg = json.loads((head / "config.json").read_text())
    w = load_file(str(head / "model.safetensors"))
    change(cfg, w)
    (head / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(head / "model.safetensors"))
    with pytest.raises(Exception) as e:
        LLM(str(target), dtype="float32", speculative_config=_eagle(head))
    msg = str(e.value)
    assert "\n" not in msg and all(x in msg for x in words), msg


def test_mtp_is_refused_saying_why():
    from halserve.engine.spec import parse_speculative_config
    from halserve.engine.spec.config import SpeculativeConfigError

    with pytest.raises(SpeculativeConfigError, match="no architecture halserve loads has them"):
        parse_speculative_config({"method": "mtp", "num_speculative_tokens": 1})
    with pytest.raises(SpeculativeConfigError, match="model=None"):
        parse_speculative_config({"method": "eagle", "num_speculative_tokens": 1})


def test_server_with_speculative_config_flag(target, tmp_path):
    """``halserve serve --speculative-config JSON`` with an EAGLE head: the completion is the
    plain engine's, and /metrics counts the drafts."""
    import urllib.request

    from tests.server.server_proc import ServerProcess

    head = make_head(tmp_path / "head", target, "random")
    ref = _tokens(LLM(str(target), dtype="float32"), PROMPTS[1:2], GREEDY)[0]
    srv = ServerProcess([str(target), "--host", "127.0.0.1", "--port", "0", "--dtype", "float32",
                         "--served-model-name", "tiny", "--speculative-config", json.dumps(_eagle(head, 3))],
                        tmp_path / "serve.log")
    try:
        body = json.dumps({"model": "tiny", "prompt": PROMPTS[1], "max_tokens": GREEDY.max_tokens,
                           "temperature": 0, "ignore_eos": True, "logprobs": 0}).encode()
        req = urllib.request.Request(srv.url + "/v1/completions", body, {"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=60).read())
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=60).read().decode()
    finally:
        assert srv.stop() == 0, srv.log()
    text = LLM(str(target), dtype="float32").get_tokenizer().decode(ref)
    assert out["choices"][0]["text"] == text
    drafted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("halserve:spec_decode_num_draft_tokens_total")]
    assert drafted and drafted[0] > 0, metrics[:2000]

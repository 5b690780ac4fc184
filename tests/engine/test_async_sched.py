"""Async scheduling (engine/core.py ``_step_async``) on the CPU: a backend double that says
its device runs apart from the host makes the engine schedule and launch step n+1 before it
reads step n's tokens (placeholders, the device-side token feed, the dropped extra row of a
sequence that step n finished). Everything is checked against the synchronous path of the
same backend: token-exact, greedy and seeded, over mixed batches with arrivals, aborts,
stop strings, max_tokens=1, n>1 and preemption; no token past a stop is ever emitted and
the KV cache is empty at the end."""
from __future__ import annotations

import logging

import pytest

from halserve import hal
from halserve.config import ConfigError, EngineConfig
from halserve.engine.core import EngineCore
from halserve.engine.sampling import SamplingParams
from halserve.hal.interface import Capabilities, ProbeResult
from halserve.hal.native import NativeBackend


class AsyncDouble(NativeBackend):
    """Native ops; says its device runs apart from the host (test only)."""

    name = "test_async_double"

    @classmethod
    def probe(cls) -> ProbeResult:
        return ProbeResult(0, "test backend: only when forced")

    @classmethod
    def interpreter_ok(cls) -> bool:
        return True

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(async_device=True)


class _Replay:
    def __init__(self, fn):
        self.fn = fn

    def replay(self):
        return self.fn()  # reads the static buffers as they are now, like a real graph


class AsyncGraphDouble(AsyncDouble):
    """As AsyncDouble, with 'graphs' that call the captured step again (the decode-graph
    path of the token feed)."""

    name = "test_async_graph_double"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(async_device=True, graphs=True)

    def capture_graph(self, fn, *args):
        return _Replay(lambda: fn(*args))


@pytest.fixture(scope="module")
def model(checkpoint):
    hal.register(AsyncDouble)
    hal.register(AsyncGraphDouble)
    return str(checkpoint("qwen3"))


def engine(model, async_on: bool, backend: str = "test_async_double", **kw) -> EngineCore:
    cfg = EngineConfig(model=model, dtype="float32", backend=backend, async_scheduling=async_on,
                       max_num_seqs=kw.pop("max_num_seqs", 8), max_num_batched_tokens=kw.pop("tokens", 64), **kw)
    e = EngineCore(cfg)
    assert e.async_scheduling is async_on
    return e


class Run:
    """Drive an engine step by step: ``events[i]`` (adds, aborts) happen before step i;
    collects each request's delta outputs and checks them as they come."""

    def __init__(self, eng: EngineCore, events: dict[int, list]):
        self.eng, self.events = eng, events
        self.tokens: dict[str, dict[int, list[int]]] = {}
        self.text: dict[str, dict[int, str]] = {}
        self.reason: dict[str, dict[int, str | None]] = {}
        self.fed = 0  # decode rows whose input token came from the step before, on the device

    def take(self, out) -> None:
        rid = out.request_id
        for c in out.outputs:
            toks = self.tokens.setdefault(rid, {}).setdefault(c.index, [])
            assert self.reason.setdefault(rid, {}).get(c.index) is None, f"{rid}: output after it finished"
            assert all(t >= 0 for t in c.token_ids), f"{rid}: a placeholder was emitted"
            toks.extend(c.token_ids)
            self.text.setdefault(rid, {})[c.index] = self.text.get(rid, {}).get(c.index, "") + c.text
            self.reason[rid][c.index] = c.finish_reason

    def go(self, max_steps: int = 400) -> "Run":
        eng = self.eng
        runner = eng.runner
        feed = runner._feed

        def counting(so, prev):
            src, dst = feed(so, prev)
            self.fed += len(dst)
            return src, dst

        runner._feed = counting

        def no_failed_steps(so, error):  # a failed batch recovers row by row: none may fail here
            raise AssertionError(f"a step failed: {error!r}")

        eng._execute_rows_apart = no_failed_steps
        last = max(self.events, default=0)
        for i in range(max_steps):
            for ev in self.events.get(i, []):
                if ev[0] == "add":
                    eng.add_request(ev[1], ev[2], ev[3], output_kind="delta")
                else:
                    out = eng.abort_request(ev[1])
                    if out is not None:
                        self.take(out)
            if i > last and not eng.has_unfinished():
                break
            for out in eng.step():
                self.take(out)
        else:
            raise AssertionError("the engine did not finish")
        assert not eng.drain()  # nothing left to say once every request has finished
        assert eng.get_metrics()["kv_cache_usage"] == 0.0, "KV blocks still held after every request ended"
        assert all(not s.num_pending for s in eng.scheduler.running)
        return self


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, **kw)


def mixed_events():
    p = [[5, 17, 42, 9], list(range(10, 47)), [9] * 20, [3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8] * 6]
    return {
        0: [("add", "g0", p[0], greedy(12)), ("add", "s0", p[1], SamplingParams(temperature=0.9, top_k=20, seed=11,
                                                                                  max_tokens=10, ignore_eos=True)),
            ("add", "one", p[2], greedy(1))],
        2: [("add", "n3", p[3], SamplingParams(n=3, temperature=1.0, top_p=0.9, seed=5, max_tokens=7,
                                               ignore_eos=True)),
            ("add", "lp", p[4], greedy(6, logprobs=2))],
        4: [("add", "unseeded", p[0] + p[3], SamplingParams(temperature=0.7, max_tokens=9, ignore_eos=True,
                                                           min_tokens=3))],
        5: [("abort", "s0")],
        6: [("add", "late", p[1][:9], greedy(8, logit_bias={7: 5.0}))],
        7: [("abort", "never-there")],
    }


def compare(sync: Run, asy: Run, aborted=()) -> None:
    assert set(sync.tokens) == set(asy.tokens)
    for rid in sync.tokens:
        if rid in aborted:  # the async engine had one token fewer out when it was aborted
            for i, toks in asy.tokens[rid].items():
                assert toks == sync.tokens[rid][i][:len(toks)], rid
            continue
        assert asy.tokens[rid] == sync.tokens[rid], rid
        assert asy.text[rid] == sync.text[rid], rid
        assert asy.reason[rid] == sync.reason[rid], rid


@pytest.mark.parametrize("backend", ["test_async_double", "test_async_graph_double"])
def test_mixed_batch_with_arrivals_and_aborts_matches_sync(model, backend):
    kw = {} if backend == "test_async_double" else {"max_num_seqs": 8}
    sync = Run(engine(model, False, backend, **kw), mixed_events()).go()
    asy = Run(engine(model, True, backend, **kw), mixed_events()).go()
    compare(sync, asy, aborted={"s0"})
    assert asy.fed > 20 and sync.fed == 0  # the overlap really ran
    assert len(sync.tokens["n3"]) == 3 and sync.reason["one"][0] == "length"
    assert [len(t) for t in asy.tokens["n3"].values()] == [7, 7, 7]


def test_stop_strings_and_stop_tokens_emit_nothing_past_the_stop(model):
    prompts = [[5, 17, 42, 9], list(range(10, 30)), [3, 1, 4, 1, 5, 9, 2, 6]]
    base = Run(engine(model, False), {0: [("add", f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)]}).go()
    events = {0: []}
    for i, p in enumerate(prompts):
        toks, text = base.tokens[f"r{i}"][0], base.text[f"r{i}"][0]
        # a stop string found mid-way through the text, and a stop token mid-way through the ids
        stop = text[len(text) // 2: len(text) // 2 + 2]
        events[0].append(("add", f"str{i}", p, greedy(16, stop=[stop])))
        events[0].append(("add", f"tok{i}", p, greedy(16, stop_token_ids=[toks[5]])))
        events[0].append(("add", f"inc{i}", p, greedy(16, stop=[stop], include_stop_str_in_output=True)))
        # min_tokens = j lets a stop token through as the (j+1)-th output exactly: counted with
        # the token in flight, as a synchronous step counts it
        j = next(j for j in range(2, 16) if toks[j] not in toks[:j])
        events[0].append(("add", f"min{i}", p, greedy(16, stop_token_ids=[toks[j]], min_tokens=j)))
    sync = Run(engine(model, False), events).go()
    asy = Run(engine(model, True), events).go()
    compare(sync, asy)
    for i in range(len(prompts)):
        toks = base.tokens[f"r{i}"][0]
        cut = toks.index(toks[5]) + 1
        assert asy.tokens[f"tok{i}"][0] == toks[:cut] and asy.reason[f"tok{i}"][0] == "stop"
        assert asy.reason[f"str{i}"][0] == "stop" and len(asy.tokens[f"str{i}"][0]) < 16
        j = next(j for j in range(2, 16) if toks[j] not in toks[:j])
        assert asy.tokens[f"min{i}"][0] == toks[:j + 1] and asy.reason[f"min{i}"][0] == "stop"
        assert asy.tokens[f"str{i}"][0] == toks[:len(asy.tokens[f"str{i}"][0])]


def test_preemption_mid_flight_matches_sync(model):
    """A KV cache of a few blocks: running sequences are preempted (recomputed) while a step
    is in flight, and come back."""
    prompts = [list(range(3 + i, 3 + i + 9)) for i in range(6)]
    events = {0: [("add", f"p{i}", p, greedy(20) if i % 2 else SamplingParams(temperature=0.8, seed=i,
                                                                             max_tokens=20, ignore_eos=True))
                  for i, p in enumerate(prompts)]}
    sync_e = engine(model, False, num_gpu_blocks_override=9, enable_prefix_caching=False)
    asy_e = engine(model, True, num_gpu_blocks_override=9, enable_prefix_caching=False)
    sync, asy = Run(sync_e, events).go(), Run(asy_e, events).go()
    assert sync_e.scheduler.num_preemptions > 0 and asy_e.scheduler.num_preemptions > 0
    compare(sync, asy)


def test_penalties_and_prompt_logprobs_fall_back_per_step(model, caplog):
    """Rows whose sampling reads their own tokens (penalties) wait for the step before;
    prompt_logprobs rows are scored on the host: same tokens and numbers either way."""
    p = [[5, 17, 42, 9, 5, 17], list(range(10, 25)), [9] * 20, [2, 7, 1, 8] * 6]
    # strong penalties: a token left out of them (its placeholder counted instead) changes the
    # draws of these repetitive random-model outputs
    pen = dict(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=2.0, frequency_penalty=2.0,
               presence_penalty=2.0)
    events = {0: [("add", f"pen{i}", q, SamplingParams(**pen)) for i, q in enumerate(p)]
              + [("add", "plain", p[1], greedy(10))],
              1: [("add", "plp", p[1], greedy(4, prompt_logprobs=2, logprobs=1))]}
    sync_e, asy_e = engine(model, False), engine(model, True)
    with caplog.at_level(logging.INFO, logger="halserve"):
        sync, asy = Run(sync_e, events).go(), Run(asy_e, events).go()
    compare(sync, asy)
    # the fallbacks are said by name, once each
    assert caplog.text.count("a step with a presence/frequency/repetition penalty row waits") == 1
    assert caplog.text.count("a step with a prompt_logprobs row waits for the device") == 1


def test_refusals(model):
    with pytest.raises(ConfigError, match="async_scheduling=True is not supported with speculative_config"):
        EngineConfig(model=model, async_scheduling=True, speculative_config={"method": "ngram",
                                                                            "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match="backend native runs its device work on the host"):
        EngineCore(EngineConfig(model=model, dtype="float32", backend="native", async_scheduling=True))
    with pytest.raises(ConfigError, match="async_scheduling='yes'"):
        EngineConfig(model=model, async_scheduling="yes")
    # unset: on for a device apart from the host, off for the host itself
    assert EngineCore(EngineConfig(model=model, dtype="float32", backend="test_async_double")).async_scheduling
    assert not EngineCore(EngineConfig(model=model, dtype="float32", backend="native")).async_scheduling

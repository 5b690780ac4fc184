"""Every proposer kind through ``halserve serve --speculative-config JSON``: the completion is the
plain engine's token for token (greedy, float32) and /metrics counts the drafts. EAGLE heads have
their own server test (test_spec_eagle.py). A callable is named by its import path in JSON."""
from __future__ import annotations

import json
import urllib.request

import pytest

from halserve import LLM, SamplingParams
from halserve.engine.spec import parse_speculative_config
from halserve.engine.spec.config import SpeculativeConfigError

PROMPT = [7, 7, 7, 200, 201, 202, 7, 7, 7, 200, 201, 30, 31, 7, 7, 7, 200]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def target(checkpoint):
    return checkpoint("llama")


def _configs(target):
    return {
        "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1},
        "draft_model": {"method": "draft_model", "model": str(target), "num_speculative_tokens": 2},
        "callable": {"method": "callable", "proposer": "tests.helpers.proposers:repeat_last",
                     "num_speculative_tokens": 3},
    }


@pytest.mark.parametrize("kind", ["ngram", "draft_model", "callable"])
def test_every_proposer_kind_through_the_server(target, tmp_path, kind):
    from tests.server.server_proc import ServerProcess

    llm = LLM(str(target), dtype="float32")
    ref = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    text = llm.get_tokenizer().decode(ref[0].outputs[0].token_ids)
    del llm
    srv = ServerProcess([str(target), "--host", "127.0.0.1", "--port", "0", "--dtype", "float32",
                         "--served-model-name", "tiny", "--speculative-config", json.dumps(_configs(target)[kind])],
                        tmp_path / "serve.log")
    try:
        body = json.dumps({"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(srv.url + "/v1/completions", body, {"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=60).read())
        metrics = urllib.request.urlopen(srv.url + "/metrics", timeout=60).read().decode()
    finally:
        assert srv.stop() == 0, srv.log()
    assert out["choices"][0]["text"] == text
    drafted = [float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("halserve:spec_decode_num_draft_tokens_total")]
    assert drafted and drafted[0] > 0, metrics[:2000]


def test_callable_by_import_path_and_its_errors():
    from tests.helpers.proposers import repeat_last

    c = parse_speculative_config({"method": "callable", "num_speculative_tokens": 2,
                                  "proposer": "tests.helpers.proposers:repeat_last"})
    assert c.proposer is repeat_last
    for path, words in [("tests.helpers.proposers", "'package.module:function'"),
                        ("tests.helpers.no_such_module:f", "ModuleNotFoundError"),
                        ("tests.helpers.proposers:missing", "AttributeError"),
                        ("tests.helpers.proposers:NOT_CALLABLE", "is not callable")]:
        with pytest.raises(SpeculativeConfigError) as e:
            parse_speculative_config({"method": "callable", "num_speculative_tokens": 2, "proposer": path})
        assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_speculative_config_flag_is_one_line(target, tmp_path):
    """A bad config on the command line ends the server with one clear line, no traceback."""
    import subprocess
    import sys

    from tests.server.server_proc import ROOT

    bad = json.dumps({"method": "callable", "num_speculative_tokens": 2, "proposer": "nope:nothing"})
    p = subprocess.run([sys.executable, "-m", "halserve.cli", "serve", str(target), "--port", "0",
                        "--speculative-config", bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr + p.stdout, p.stderr[-2000:]
    assert "proposer='nope:nothing' could not be loaded" in p.stderr + p.stdout, p.stderr[-2000:]

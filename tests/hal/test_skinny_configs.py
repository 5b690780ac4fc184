"""The skinny GEMM's launch-config lookup (hal/triton/configs.py): the tuned table's entries
carry exactly the kernel's keys, a sweep's file ($HALSERVE_SKINNY_CONFIGS) is read before the
table, and a bad file is refused by name. No GPU: arch and SM count are forced."""
from __future__ import annotations

import json

import pytest

from halserve.hal.triton import configs

KEYS = {"KIND", "BLOCK_N", "BLOCK_K", "SPLITS", "FUSED", "QUANT_IN", "num_warps", "num_stages"}


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(configs, "_device_sms", lambda index=0: 132)
    configs._skinny_file.cache_clear()
    with configs.forced_arch("sm90"):
        yield
    configs._skinny_file.cache_clear()


def test_tuned_entries_and_rules_are_kernel_configs(sm90):
    for (wt, rows, n, k), cfg in configs.SKINNY_TUNED["sm90"].items():
        assert set(cfg) - {"PDL"} == KEYS and cfg["KIND"] in ("dot", "gemv", "gemvr"), (wt, rows, n, k)
        assert configs.skinny_config(rows, n, k, 1 if wt == "fp8" else 2) == cfg
    for (wt, rows), rule in configs.SKINNY_RULE.items():
        cfg = configs.skinny_config(rows, 8192, 8192, 1 if wt == "fp8" else 2)
        assert set(cfg) - {"PDL"} == KEYS and cfg["SPLITS"] >= 1


def test_sweep_file_is_read_before_the_table(sm90, tmp_path, monkeypatch):
    mine = dict(KIND="gemvr", BLOCK_N=32, BLOCK_K=512, SPLITS=2, FUSED=True, QUANT_IN=True, num_warps=4,
                num_stages=1)
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"arch": "sm90", "entries": [
        {"weights": "fp8", "rows": 1, "N": 6144, "K": 4096, "cfg": mine},
        {"weights": "fp8", "rows": 1, "N": 999, "K": 4096, "cfg": dict(mine, SPLITS=4)}]}))
    before = configs.skinny_config(1, 4096, 4096, 1)
    monkeypatch.setenv(configs.SKINNY_FILE_ENV, str(path))
    assert configs.skinny_config(1, 6144, 4096, 1) == mine
    assert configs.skinny_config(1, 999, 4096, 1)["SPLITS"] == 4
    assert configs.skinny_config(1, 4096, 4096, 1) == before  # not in the file: the table
    assert configs.skinny_config(4, 6144, 4096, 1) == configs.SKINNY_TUNED["sm90"][("fp8", 4, 6144, 4096)]


@pytest.mark.parametrize("doc", ['{"arch": "sm90"}', "not json",
                                 '{"arch": "sm90", "entries": [{"weights": "fp8", "rows": 1, "N": 8, "K": 8, '
                                 '"cfg": {"KIND": "gemv", "BLOCK_N": 16}}]}'])
def test_bad_sweep_file_is_refused_by_name(sm90, tmp_path, monkeypatch, doc):
    path = tmp_path / "bad.json"
    path.write_text(doc)
    monkeypatch.setenv(configs.SKINNY_FILE_ENV, str(path))
    with pytest.raises(ValueError, match="HALSERVE_SKINNY_CONFIGS=.*bad.json"):
        configs.skinny_config(1, 6144, 4096, 1)


@pytest.mark.parametrize("entry, words", [
    ({"rows": 2}, "rows 2"), ({"weights": "int8"}, "weights 'int8'"), ({"cfg_BLOCK_N": 0}, "positive integers"),
    ({"cfg_SPLITS": "2"}, "positive integers")])
def test_sweep_file_values_are_checked(sm90, tmp_path, monkeypatch, entry, words):
    cfg = dict(KIND="gemv", BLOCK_N=16, BLOCK_K=512, SPLITS=1, FUSED=False, QUANT_IN=True, num_warps=4, num_stages=1)
    e = {"weights": "fp8", "rows": 1, "N": 6144, "K": 4096}
    for key, v in entry.items():
        if key.startswith("cfg_"):
            cfg[key[4:]] = v
        else:
            e[key] = v
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"arch": "sm90", "entries": [dict(e, cfg=cfg)]}))
    monkeypatch.setenv(configs.SKINNY_FILE_ENV, str(path))
    with pytest.raises(ValueError, match=words):
        configs.skinny_config(1, 6144, 4096, 1)


def test_sweep_file_for_another_card_is_refused(sm90, tmp_path, monkeypatch):
    cfg = dict(KIND="gemv", BLOCK_N=16, BLOCK_K=512, SPLITS=1, FUSED=False, QUANT_IN=True, num_warps=4, num_stages=1)
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"arch": "sm100", "entries": [
        {"weights": "fp8", "rows": 1, "N": 6144, "K": 4096, "cfg": cfg}]}))
    monkeypatch.setenv(configs.SKINNY_FILE_ENV, str(path))
    with pytest.raises(ValueError, match="for sm100, this device is sm90"):
        configs.skinny_config(1, 6144, 4096, 1)

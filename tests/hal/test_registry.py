"""Backend registry, selection, probing and `halserve probe`."""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

import pytest

from halserve import hal
from halserve.errors import BackendUnavailable
from halserve.hal import probe, probe_cli
from halserve.hal.interface import ProbeResult
from halserve.hal.native import NativeBackend


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("HALSERVE_BACKEND", raising=False)
    monkeypatch.setattr(hal, "_registered", {})
    monkeypatch.setattr(hal, "_current", None)


def test_import_is_light():
    code = "import sys, halserve.hal; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"


def test_available_lists_every_known_backend():
    rows = {n: (cls, p) for n, cls, p in hal.available()}
    assert set(hal.KNOWN_BACKENDS) <= set(rows)
    assert rows["native"][0] is NativeBackend and rows["native"][1].score == 1
    for name, (cls, p) in rows.items():
        assert p.reason, f"{name} has no reason"
        if cls is None:
            assert p.score == 0


def test_select_native_here_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="halserve"):
        b = hal.select()
    if all(p.score <= 1 for n, _, p in hal.available() if n != "native"):
        assert b.name == "native"
    assert hal.current() is b
    lines = [r.getMessage() for r in caplog.records if r.name == "halserve"]
    assert len(lines) == 1 and b.name in lines[0]


def test_forced_unavailable_raises_with_reason(monkeypatch):
    class Nope(NativeBackend):
        name = "nope"

        @classmethod
        def probe(cls):
            return ProbeResult(0, "no nope device here")

    hal.register(Nope)
    with pytest.raises(BackendUnavailable, match="no nope device here"):
        hal.select("nope")
    monkeypatch.setenv("HALSERVE_BACKEND", "nope")
    with pytest.raises(BackendUnavailable, match="no nope device here"):
        hal.select()
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        hal.select("does_not_exist")
    with pytest.raises(BackendUnavailable, match="device index"):
        hal.select("native:x")


def test_env_forces_with_index(monkeypatch):
    monkeypatch.setenv("HALSERVE_BACKEND", "native:0")
    b = hal.select()
    assert b.name == "native" and str(b.device) == "cpu:0"


def test_highest_score_wins_and_ties_follow_preference():
    class Fast(NativeBackend):
        name = "fast_oot"

        @classmethod
        def probe(cls):
            return ProbeResult(50, "fast here")

    class FakeAmx(NativeBackend):
        name = "cpu_amx"

        @classmethod
        def probe(cls):
            return ProbeResult(50, "amx here")

    hal.register(Fast)
    assert hal.select().name == "fast_oot"
    hal.register(FakeAmx)  # same score: the known preference order wins
    assert hal.select().name == "cpu_amx"


def test_probe_that_raises_scores_zero():
    class Broken(NativeBackend):
        name = "broken"

        @classmethod
        def probe(cls):
            raise RuntimeError("boom")

    hal.register(Broken)
    row = [r for r in hal.available() if r[0] == "broken"][0]
    assert row[2].score == 0 and "boom" in row[2].reason
    assert hal.select().name != "broken"


def test_interpreter_hook_runs_forced_backend_on_cpu():
    class Interp(NativeBackend):
        name = "interp"

        @classmethod
        def probe(cls):
            return ProbeResult(0, "no GPU")

        @classmethod
        def interpreter_ok(cls):
            return True

    hal.register(Interp)
    b = hal.select("interp")
    assert b.name == "interp" and str(b.device) == "cpu"
    assert hal.select().name != "interp"  # never chosen automatically


def test_batch_invariant_skips_backends_without_it():
    from halserve.hal.interface import Capabilities

    class Variant(NativeBackend):
        name = "variant"

        @classmethod
        def probe(cls):
            return ProbeResult(90, "here")

        @property
        def capabilities(self):
            return Capabilities(batch_invariant=False)

    hal.register(Variant)
    assert hal.select().name == "variant"
    assert hal.select(batch_invariant=True).name != "variant"
    with pytest.raises(BackendUnavailable, match="batch-invariant"):
        hal.select("variant", batch_invariant=True)


def test_entry_point_backends(monkeypatch):
    class Ep:
        name = "oot"
        value = "somepkg:OotBackend"

        def load(self):
            class Oot(NativeBackend):
                name = "oot"

                @classmethod
                def probe(cls):
                    return ProbeResult(7, "out of tree")
            return Oot

    class BadEp(Ep):
        name = "bad"

        def load(self):
            raise ImportError("missing dep")

    monkeypatch.setattr(hal, "_entry_points", lambda: {"oot": Ep(), "bad": BadEp()})
    # only native in tree, whatever backends this checkout has (cpu_amx outscores 7 on x86)
    monkeypatch.setattr(hal, "KNOWN_BACKENDS", {"native": hal.KNOWN_BACKENDS["native"]})
    rows = {n: p for n, _, p in hal.available()}
    assert rows["oot"].score == 7 and rows["bad"].score == 0 and "missing dep" in rows["bad"].reason
    assert hal.select().name == "oot"


def test_register_needs_a_name():
    with pytest.raises(ValueError, match="name"):
        hal.register(type("X", (), {}))


def test_hardware_facts_never_raise(monkeypatch):
    facts = probe.hardware_facts()
    assert facts["cpu"]["arch"] and facts["cpu"]["cores"] >= 1
    assert isinstance(facts["gpus"], list)
    facts["cpu"]["arch"] = "mutated"
    assert probe.hardware_facts()["cpu"]["arch"] != "mutated"  # callers get a copy
    monkeypatch.setattr(probe, "_facts", lambda: 1 / 0)
    assert "error" in probe.hardware_facts()


def test_cpuinfo_unreadable(monkeypatch):
    monkeypatch.setattr(probe, "_cpuinfo", lambda: {})
    assert probe.cpu_facts()["arch"]


def test_riscv_isa_parsing():
    assert probe.riscv_extensions("rv64imafdcv_zicsr_zvfh")["v"] is True
    assert probe.riscv_extensions("rv64imafdcv_zicsr_zvfh")["zvfh"] is True
    assert probe.riscv_extensions("rv64imafdc_zicsr")["v"] is False
    assert probe.riscv_extensions("rv64gc_zve64x_v")["v"] is True
    assert probe.riscv_extensions("garbage")["v"] is False


def _run_cli(capsys, *argv):
    p = argparse.ArgumentParser()
    probe_cli.add_arguments(p)
    rc = probe_cli.main(p.parse_args(list(argv)))
    return rc, capsys.readouterr().out


def test_probe_cli_table(capsys):
    rc, out = _run_cli(capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["backend", "score", "chosen"]
    chosen = [ln for ln in lines[1:] if " * " in ln]
    assert len(chosen) == 1
    for name in hal.KNOWN_BACKENDS:
        row = next(ln for ln in lines if ln.startswith(name + " "))
        assert len(row.split()) >= 3  # every backend has a reason
    assert "cpu:" in out


def test_probe_cli_json(capsys):
    rc, out = _run_cli(capsys, "--json")
    data = json.loads(out)
    assert rc == 0 and data["chosen"]
    assert {b["name"] for b in data["backends"]} >= set(hal.KNOWN_BACKENDS)
    assert sum(b["chosen"] for b in data["backends"]) == 1
    assert "cpu" in data["hardware"]

"""The shared C build route: compiles once into a per-user cache, reloads, fails with one line."""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from halserve.hal import cbuild

pytestmark = pytest.mark.skipif(cbuild.find_compiler() is None, reason="no C compiler on this machine")

CDEF = "int add3(int a, int b, int c);"


def _src(tmp_path, body="return a + b + c;"):
    src = tmp_path / "k.c"
    src.write_text("int add3(int a, int b, int c) { " + body + " }\n")
    return src


def test_builds_caches_and_rebuilds_on_change(tmp_path, monkeypatch):
    monkeypatch.setenv("HALSERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = _src(tmp_path)
    ffi, lib = cbuild.load_library("t_add", [src], CDEF, ["-O2"])
    assert lib.add3(1, 2, 3) == 6
    built = list((tmp_path / "cache").glob("t_add-*.so"))
    assert len(built) == 1 and not list((tmp_path / "cache").glob("*.tmp.so"))
    # a changed source is a different library, never the stale one
    src.write_text("int add3(int a, int b, int c) { return a * b * c; }\n")
    _, lib2 = cbuild.load_library("t_add", [src], CDEF, ["-O2"])  # same flags: only the source moved
    assert lib2.add3(1, 2, 3) == 6 and lib2.add3(2, 2, 3) == 12
    assert len(list((tmp_path / "cache").glob("t_add-*.so"))) == 2


def test_concurrent_builds_leave_one_complete_library(tmp_path, monkeypatch):
    monkeypatch.setenv("HALSERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = _src(tmp_path, "return a - b - c;")
    path = cbuild.library_path("t_conc", [src], ["-O1"])
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: cbuild._compile(cbuild.find_compiler(), [src], ["-O1"], [], path), range(3)))
    assert path.is_file() and not list(path.parent.glob("*.tmp.so"))
    _, lib = cbuild.load_library("t_conc", [src], CDEF, ["-O1"])
    assert lib.add3(10, 2, 3) == 5


def test_prebuilt_library_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("HALSERVE_CACHE_DIR", str(tmp_path / "cache"))
    src = _src(tmp_path, "return 7 * a;")
    path = cbuild.library_path("t_pre", [src], [])
    cbuild._compile(cbuild.find_compiler(), [src], [], [], path)
    monkeypatch.setenv("HALSERVE_T_PRE2_LIB", str(path))
    _, lib = cbuild.load_library("t_pre2", [tmp_path / "absent.c"], CDEF, [])
    assert lib.add3(3, 0, 0) == 21
    monkeypatch.setenv("HALSERVE_T_PRE3_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(cbuild.CBuildError, match="nope.so is not a file"):
        cbuild.load_library("t_pre3", [src], CDEF, [])


def test_no_compiler_and_bad_source_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HALSERVE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    with pytest.raises(cbuild.CBuildError, match="no C compiler found"):
        cbuild.load_library("t_none", [_src(tmp_path)], CDEF, [])
    monkeypatch.delenv("CC")
    bad = _src(tmp_path, "return a +;")
    with pytest.raises(cbuild.CBuildError, match="compiling t_bad.* failed") as ei:
        cbuild.load_library("t_bad", [bad], CDEF, [])
    assert "\n" not in str(ei.value)
    assert not list((tmp_path / "cache").glob("*.so"))

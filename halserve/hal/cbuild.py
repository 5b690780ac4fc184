"""One build route for C kernels: compile with the system C compiler, load through cffi (ABI mode).

``load_library(name, sources, cdef, cflags)`` compiles ``sources`` into a shared library
cached per user (``$HALSERVE_CACHE_DIR`` or ``~/.cache/halserve``) under a name that hashes
the sources, the flags, the compiler's version and the machine, so an edit or a new compiler
builds afresh and nothing stale is ever loaded. The build writes a temporary file and renames
it into place, so concurrent processes never load a half-written library. A prebuilt library
(e.g. cross-compiled for riscv64) is taken from ``HALSERVE_<NAME>_LIB`` without compiling.

Every failure is a ``CBuildError`` with one line that says why (no compiler, compile error,
cffi missing); a backend's probe turns it into score 0 and a reason, never a crash.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

_LOADED: dict[tuple, tuple] = {}


class CBuildError(RuntimeError):
    """The C library could not be built or loaded; the message is one line saying why."""


def cache_dir() -> Path:
    root = os.environ.get("HALSERVE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "halserve"


def find_compiler() -> list[str] | None:
    """The C compiler command: ``$CC`` (may carry flags), else cc, gcc or clang on PATH."""
    cc = os.environ.get("CC", "").split()
    if cc:
        return cc if shutil.which(cc[0]) else None
    for cand in ("cc", "gcc", "clang"):
        path = shutil.which(cand)
        if path:
            return [path]
    return None


def _compiler_version(cc: list[str]) -> str:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise CBuildError(f"C compiler {' '.join(cc)!r} does not run: {e}") from None


def _env_lib(name: str) -> str | None:
    return os.environ.get(f"HALSERVE_{name.upper()}_LIB") or None


def library_path(name: str, sources: Sequence[Path], cflags: Sequence[str],
                 ldflags: Sequence[str] = ()) -> Path:
    """Where the built library for these inputs lives (built or not)."""
    cc = find_compiler()
    if cc is None:
        raise CBuildError("no C compiler found (set CC, or install gcc or clang)")
    h = hashlib.sha256()
    for src in sources:
        h.update(str(Path(src).name).encode())
        h.update(Path(src).read_bytes())
    # headers next to the sources are part of what the sources mean
    for hdr in sorted({p for s in sources for p in Path(s).parent.glob("*.h")}):
        h.update(hdr.name.encode())
        h.update(hdr.read_bytes())
    h.update("\0".join([*cc, *cflags, "|", *ldflags]).encode())
    h.update(_compiler_version(cc).encode())
    h.update(platform.machine().encode())
    return cache_dir() / f"{name}-{h.hexdigest()[:16]}.so"


def _compile(cc: list[str], sources: Sequence[Path], cflags: Sequence[str],
             ldflags: Sequence[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    cmd = [*cc, "-shared", "-fPIC", *cflags, *map(str, sources), "-o", tmp, *ldflags]
    t0 = time.monotonic()
    print(f"halserve: compiling {target.stem} from {len(sources)} C file(s) (first use, ~10 s) ...",
          file=sys.stderr, flush=True)
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as e:
        os.unlink(tmp)
        raise CBuildError(f"compiler failed to run: {e}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip()[:300])
        raise CBuildError(f"compiling {target.stem} failed: {first}")
    os.replace(tmp, target)  # atomic: a concurrent loader sees the old name absent or complete
    print(f"halserve: compiled {target.name} in {time.monotonic() - t0:.1f} s",
          file=sys.stderr, flush=True)


def load_library(name: str, sources: Sequence[Path], cdef: str, cflags: Sequence[str],
                 ldflags: Sequence[str] = ()) -> tuple:
    """Build (once, cached) and load a C library; returns ``(ffi, lib)``."""
    sources = [Path(s) for s in sources]
    try:
        import cffi
    except ImportError:
        raise CBuildError("the cffi package is not installed (pip install cffi)") from None
    prebuilt = _env_lib(name)
    if prebuilt:
        if not Path(prebuilt).is_file():
            raise CBuildError(f"HALSERVE_{name.upper()}_LIB={prebuilt} is not a file")
        path = Path(prebuilt)
    else:
        # keyed by the content hash in the name: an edited source is a new library, in this
        # process too
        path = library_path(name, sources, cflags, ldflags)
    key = (str(path), cdef)
    if key in _LOADED:
        return _LOADED[key]
    if not prebuilt and not path.is_file():
        _compile(find_compiler(), sources, cflags, ldflags, path)
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    try:
        lib = ffi.dlopen(str(path))
    except OSError as e:
        raise CBuildError(f"cannot load {path}: {e}") from None
    _LOADED[key] = (ffi, lib)
    return ffi, lib

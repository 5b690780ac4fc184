"""The engine and the models are backend-neutral: they never import a platform backend and
never branch on the hardware; the HAL object they are handed decides everything."""
from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "halserve"
NEUTRAL_DIRS = ("engine", "models")
BACKENDS = re.compile(r"^halserve\.hal\.(cuda|rocm|cpu_amx|riscv_rvv)(\.|$)")
HARDWARE_CHECKS = re.compile(r"torch\s*\.\s*cuda\s*\.|\bis_available\s*\(|torch\s*\.\s*version\s*\.\s*hip"
                             r"|platform\s*\.\s*machine")


def neutral_files() -> list[Path]:
    return sorted(f for d in NEUTRAL_DIRS for f in (PKG / d).rglob("*.py"))


def imported_modules(path: Path) -> list[str]:
    """Absolute names of every module imported, including relative and importlib imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__"):
            names.append(node.args[0].value)
    return names


def code_without_comments_and_strings(path: Path) -> str:
    toks = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return " ".join(t.string for t in toks if t.type not in (tokenize.COMMENT, tokenize.STRING))


def test_there_is_something_to_check():
    assert any(f.parent.name == "models" for f in neutral_files())


@pytest.mark.parametrize("path", neutral_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_backend_imports(path):
    bad = [m for m in imported_modules(path) if BACKENDS.match(m)]
    assert not bad, f"{path.relative_to(PKG)} imports backend module(s) {bad}; take the HAL as an argument"


@pytest.mark.parametrize("path", neutral_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_no_hardware_branches(path):
    found = HARDWARE_CHECKS.findall(code_without_comments_and_strings(path))
    assert not found, f"{path.relative_to(PKG)} checks the hardware ({found}); ask the HAL instead"


def test_checker_catches_violations(tmp_path, monkeypatch):
    """The scanners above really see the forms they claim to."""
    f = PKG / "engine" / "_probe_example.py"
    src = ("from ..hal import cuda\nimport importlib\nimportlib.import_module('halserve.hal.rocm')\n"
           "# torch.cuda.is_available() in a comment is fine\nx = torch.cuda.synchronize()\n")
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: src)
    mods = imported_modules(f)
    assert "halserve.hal.cuda" in mods and "halserve.hal.rocm" in mods
    assert HARDWARE_CHECKS.findall(code_without_comments_and_strings(f)) == ["torch . cuda ."]

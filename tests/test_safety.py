"""Static safety rules over bmad's own code: no eval/exec, no shell=True, no unsafe unpickling."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("bmad", "algorithms", "datasets_prep")
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):  # a bare call: eval(...)
                yield node, None, f.id
            elif isinstance(f, ast.Attribute):  # x.name(...): owner "x" when x is a plain name
                yield node, f.value.id if isinstance(f.value, ast.Name) else "", f.attr


def _kw(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


def test_the_rules_see_every_package():
    assert len(SOURCES) > 50 and {p.relative_to(REPO).parts[0] for p in SOURCES} == set(PACKAGES)


def problems_in(source: str, name: str) -> list[str]:
    """Every call in ``source`` that breaks the rules, as "name:line: what"."""
    problems = []
    for node, owner, call in _calls(ast.parse(source)):
        where = f"{name}:{node.lineno}"
        name_ = call
        if owner is None and name_ in ("eval", "exec", "compile", "__import__"):
            problems.append(f"{where}: {name_}()")
        shell = _kw(node, "shell")
        if shell is not None and not (isinstance(shell, ast.Constant) and shell.value is False):
            problems.append(f"{where}: {owner}.{name_}(shell=...)")
        if owner == "os" and name_ in ("system", "popen"):
            problems.append(f"{where}: os.{name_}()")
        if owner in ("pickle", "cPickle", "dill", "marshal") and name_ in ("load", "loads"):
            problems.append(f"{where}: {owner}.{name_}() (use safetensors or torch.load(weights_only=True))")
        if owner == "torch" and name_ == "load":
            wo = _kw(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        if owner in ("np", "numpy") and name_ == "load":
            ap = _kw(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                problems.append(f"{where}: numpy.load(allow_pickle=...)")
    return problems


def test_the_checker_finds_each_kind_of_problem():
    bad = """
import os, pickle, subprocess, torch, numpy as np
eval("1"); exec("x = 1"); os.system("ls"); subprocess.run("ls", shell=True)
pickle.load(f); torch.load(p); torch.load(p, weights_only=False); np.load(p, allow_pickle=True)
model.eval(); torch.load(p, weights_only=True); subprocess.run(["ls"], shell=False)
"""
    found = problems_in(bad, "bad.py")
    assert len(found) == 8, found
    assert not any(":5:" in p for p in found)  # the last line is fine


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_eval_exec_shell_or_unsafe_loading(path: Path):
    problems = problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))
    assert not problems, problems

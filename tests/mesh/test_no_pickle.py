"""No pickle, eval or other code-executing deserialisation anywhere in the repository.

Why: every byte the server reads comes from a socket a stranger can reach; one pickle.loads or
eval on any path is remote code execution. The check walks the AST of every Python source in
the repository (tests included), so comments and strings that mention the words are fine and
aliases (``import pickle as p``, ``from torch import load``) are not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".git", "build", "dist", "runs", "__pycache__", ".mypy_cache",
             ".ruff_cache", ".pytest_cache", ".hypothesis", "node_modules"}
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "pickletools", "marshal", "shelve", "dill",
                  "cloudpickle", "joblib", "copyreg"}
BANNED_BUILTINS = {"eval", "exec"}
BANNED_METHODS = {"recv_pyobj", "send_pyobj", "read_pickle", "to_pickle", "unsafe_load"}


def _sources() -> list[Path]:
    out = []
    for path in ROOT.rglob("*.py"):
        parts = set(path.relative_to(ROOT).parts[:-1])
        if not parts & SKIP_DIRS and not any(p.endswith(".egg-info") for p in parts):
            out.append(path)
    return sorted(out)


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


class _Checker(ast.NodeVisitor):
    def __init__(self) -> None:
        self.problems: list[tuple[int, str]] = []
        self.torch_names = {"torch"}  # names bound to the torch module
        self.torch_load_names: set[str] = set()  # `from torch import load [as x]`

    def flag(self, node: ast.AST, what: str) -> None:
        self.problems.append((getattr(node, "lineno", 0), what))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            root = alias.name.split(".")[0]
            if root in BANNED_MODULES:
                self.flag(node, f"import {alias.name}")
            if alias.name == "torch":
                self.torch_names.add(alias.asname or "torch")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = node.module or ""
        if module.split(".")[0] in BANNED_MODULES:
            self.flag(node, f"from {module} import ...")
        for alias in node.names:
            if alias.name in BANNED_MODULES:
                self.flag(node, f"from {module} import {alias.name}")
            if module == "torch" and alias.name == "load":
                self.torch_load_names.add(alias.asname or "load")

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in BANNED_BUILTINS:
            self.flag(node, f"{func.id}() call")
        if isinstance(func, ast.Attribute) and func.attr in BANNED_METHODS:
            self.flag(node, f".{func.attr}() call")
        if self._is_torch_load(func):
            weights_only = _kw(node, "weights_only")
            if weights_only is None or not _is_true(weights_only):
                self.flag(node, "torch.load without weights_only=True")
        allow = _kw(node, "allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            self.flag(node, "allow_pickle other than False")
        if isinstance(func, ast.Attribute) and func.attr == "load" and _is_name(func.value,
                                                                                 "yaml"):
            loader = _kw(node, "Loader")
            if loader is None or "Safe" not in ast.unparse(loader):
                self.flag(node, "yaml.load without a SafeLoader")
        self.generic_visit(node)

    def _is_torch_load(self, func: ast.expr) -> bool:
        if isinstance(func, ast.Name):
            return func.id in self.torch_load_names
        return (isinstance(func, ast.Attribute) and func.attr == "load"
                and isinstance(func.value, ast.Name) and func.value.id in self.torch_names)


def _is_name(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def check_source(text: str, filename: str = "<source>") -> list[tuple[int, str]]:
    checker = _Checker()
    checker.visit(ast.parse(text, filename=filename))
    return checker.problems


def test_the_checker_catches_each_pattern() -> None:
    bad = """
import pickle
import cPickle as cp
from marshal import loads
import shelve, os
import torch as th
from torch import load as tload
eval("1")
exec("x = 1")
th.load("f.pt")
torch.load("f.pt", weights_only=False)
tload("f.pt")
sock.recv_pyobj()
sock.send_pyobj(1)
np.load("a.npy", allow_pickle=True)
yaml.load(text)
"""
    found = [what for _, what in check_source(bad)]
    assert len(found) == 13, found
    good = """
import torch
torch.load("f.pt", weights_only=True, map_location="cpu")
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
model.eval()
yaml.load(text, Loader=yaml.SafeLoader)
s = "pickle eval( exec("
"""
    assert check_source(good) == []


def test_no_pickle_or_eval_in_the_repository() -> None:
    sources = _sources()
    assert len(sources) > 50, f"found only {len(sources)} sources under {ROOT}"
    problems = [f"{path.relative_to(ROOT)}:{line}: {what}" for path in sources
                for line, what in check_source(path.read_text(encoding="utf-8"), str(path))]
    if problems:
        pytest.fail("unsafe deserialisation or code execution:\n" + "\n".join(problems))

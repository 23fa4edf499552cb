"""Imports point one way (docs/architecture.md, "Layers"):

    pruning  <-  llava  <-  tools (eval.tools, llava.demo)  <-  scripts, tests

and eval's other modules (scorers, data preparation, tables, benchmark specs, roofline) read files: they import
neither pruning nor llava nor model libraries, and llava and the tools may use them.

Every module's imports are read from its source (AST), those inside functions included, so a lazy import is an arrow
like any other. A failure names the file and line, the module and its layer, the import and the rule it breaks.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import REPO

STATEMENT = "`pruning` <- `llava` <- tools (`eval.tools`, `llava.demo`) <- `scripts`"  # README, docs/architecture.md
PACKAGES = ("pruning", "llava", "eval", "scripts", "tests")
ALL_LAYERS = frozenset({"pruning", "files", "llava", "testing", "tools", "scripts", "tests"})

# layer -> (the first-party layers it may import, the rule in words)
RULES: dict[str, tuple[frozenset[str], str]] = {
    "pruning": (frozenset({"pruning"}), "pruning is the bottom layer: it imports no other first-party code"),
    "files": (frozenset({"files"}), "eval's file modules read files: they import neither pruning nor llava"),
    "llava": (frozenset({"llava", "pruning", "files"}), "llava uses pruning and eval's file modules, never a tool"),
    "testing": (
        frozenset({"testing", "llava", "pruning", "files"}),
        "llava.testing (tiny checkpoints) builds on llava; only tests and scripts import it",
    ),
    "tools": (
        frozenset({"tools", "llava", "pruning", "files"}),
        "the tools run models through llava and take no test fixtures (llava.testing)",
    ),
    "scripts": (ALL_LAYERS - {"tests"}, "scripts never import tests"),
    "tests": (ALL_LAYERS, ""),
}
PRUNING_MAY_USE = frozenset({"torch", "transformers", "PIL", "matplotlib"})  # PIL, matplotlib: pruning.visualize
MODEL_LIBRARIES = frozenset({"torch", "transformers", "peft", "accelerate", "safetensors", "deepspeed", "tokenizers"})
# Arrows allowed by name, with the reason (docs/architecture.md, "Layers").
EXCEPTIONS = {
    ("eval.roofline", "pruning.config"): "--kv-ratio: the KV cache's own budget rule, imported when the flag is given",
    (
        "eval.roofline",
        "pruning.kv_cache",
    ): "--kv-ratio: the KV cache's own budget rule, imported when the flag is given",
}


def layer_of(module: str) -> str:
    """The layer of a first-party module (its dotted name)."""
    top = module.split(".")[0]
    if module == "llava.demo" or module == "eval.tools" or module.startswith("eval.tools."):
        return "tools"
    if module == "llava.testing" or module.startswith("llava.testing."):
        return "testing"
    return "files" if top == "eval" else top


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # the imported module; `from package import submodule` names the submodule
    inside_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(root: Path) -> dict[str, Path]:
    """Every first-party module below ``root`` (the repository, or a scratch copy of a part of it)."""
    return {module_name(p, root): p for package in PACKAGES for p in sorted((root / package).rglob("*.py"))}


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import statement of a module: at module level, in classes and in functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    in_functions = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found += [Import(node.lineno, target, id(node) in in_functions) for target in dict.fromkeys(targets)]
    return found


def violations(root: Path, modules: dict[str, Path], known: set[str]) -> list[str]:
    """One line per import that breaks a rule."""
    problems = []
    for module, path in modules.items():
        layer = layer_of(module)
        allowed, rule = RULES[layer]
        for found in imports_of(module, path, known):
            if (module, found.target) in EXCEPTIONS:
                continue
            top = found.target.split(".")[0]
            where = f"{path.relative_to(root)}:{found.line}: {module} ({layer}) imports {found.target}"
            where += " inside a function" if found.inside_function else ""
            if top in PACKAGES:
                if layer_of(found.target) not in allowed:
                    problems.append(f"{where} ({layer_of(found.target)}): {rule}")
            elif layer == "pruning" and top not in sys.stdlib_module_names and top not in PRUNING_MAY_USE:
                problems.append(f"{where}: pruning uses only {', '.join(sorted(PRUNING_MAY_USE))} besides Python")
            elif layer == "files" and top in MODEL_LIBRARIES:
                problems.append(f"{where}: eval's file modules import no model code")
    return problems


def test_every_import_points_down_the_layers() -> None:
    modules = modules_under(REPO)
    problems = violations(REPO, modules, set(modules))
    assert not problems, "imports against docs/architecture.md#layers:\n" + "\n".join(problems)


def test_the_exceptions_are_lazy_and_still_needed() -> None:
    modules = modules_under(REPO)
    for module, target in EXCEPTIONS:
        arrows = [i for i in imports_of(module, modules[module], set(modules)) if i.target == target]
        assert arrows and all(i.inside_function for i in arrows), (module, target, arrows)


def test_the_docs_state_these_layers() -> None:
    for doc in ("README.md", "docs/architecture.md"):
        assert STATEMENT in (REPO / doc).read_text(encoding="utf-8"), doc


def test_every_module_is_in_a_layer() -> None:
    assert {layer_of(module) for module in modules_under(REPO)} <= set(RULES)


@pytest.mark.parametrize(
    ("module", "source", "message"),
    [
        (
            "pruning.toy",
            "from llava.model.builder import load_pretrained_model\n",
            "pruning.toy (pruning) imports llava",
        ),
        ("pruning.toy", "def f():\n    import llava.utils\n", "imports llava.utils inside a function (llava)"),
        ("pruning.toy", "import numpy\n", "pruning uses only PIL, matplotlib, torch, transformers besides Python"),
        ("eval.toy", "from pruning import PruningConfig\n", "eval.toy (files) imports pruning (pruning)"),
        ("eval.toy", "import torch\n", "eval's file modules import no model code"),
        ("llava.toy", "from eval.tools import speed\n", "llava.toy (llava) imports eval.tools.speed (tools)"),
        ("llava.toy", "from .testing import tiny_llava\n", "imports llava.testing.tiny_llava (testing)"),
        ("eval.tools.toy", "from llava.testing.tiny_llava import TinySpec\n", "take no test fixtures"),
        ("scripts.toy", "from tests.helpers import REPO\n", "scripts never import tests"),
    ],
)
def test_an_arrow_the_wrong_way_is_named(tmp_path: Path, module: str, source: str, message: str) -> None:
    scratch = tmp_path.joinpath(*module.split(".")).with_suffix(".py")
    scratch.parent.mkdir(parents=True)
    scratch.write_text(source)
    problems = violations(tmp_path, {module: scratch}, set(modules_under(REPO)))
    assert len(problems) == 1 and message in problems[0], problems
    assert problems[0].startswith(f"{scratch.relative_to(tmp_path)}:"), problems

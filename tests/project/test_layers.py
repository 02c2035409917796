"""The layout holds: imports go down the layers (README, *Design*), there is no import cycle, and
project imports stand at the top of files. The checker reads the sources with ``ast``, counting
imports inside functions too, and is run here on the package and on a copy with a back edge added
(it must then fail)."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "psa_dist"

# Layer of each top-level part of the package: a module may import a lower layer, or its own
# subpackage; never a higher layer or a sibling of the same layer.
LAYERS = {"core": 0, "util": 1, "config": 1, "nets": 2, "data": 2, "cluster": 2, "engine": 3,
          "stages": 4, "pipeline": 5, "bench": 5, "submit": 6, "cli": 7, "__init__": 8}
# the heavy optional dependencies that may be imported inside a function, where they are used
LAZY_ALLOWED = ("ray", "submitit", "pycocotools", "pydensecrf", "torch.utils.tensorboard")
# the one part whose functions may import the project: the command line, so that building its
# parser (`psa-dist --help`) imports no torch; each subcommand imports what it runs
LAZY_PROJECT_IMPORTS = "cli"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([root.name, *parts])


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute module names an ``from X import a, b`` names (a name may be a submodule)."""
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def imports_of(root: Path) -> tuple[dict, list]:
    """{module: {imported project module: line}} over every .py under ``root``, and the
    violations of "project imports at the top, lazy imports only of heavy optional packages"."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph, misplaced = {}, []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
        edges = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = _resolve(node, mod, path.name == "__init__.py")
            else:
                continue
            project = [n for n in names if n in files]
            for n in project:
                edges.setdefault(n, node.lineno)
            if id(node) in in_function:
                heavy = any(names[0] == a or names[0].startswith(a + ".") for a in LAZY_ALLOWED)
                # the one exception: a subcommand imports what it runs (the parser without torch)
                if (project and _part(mod) != LAZY_PROJECT_IMPORTS) or not (project or heavy):
                    misplaced.append(f"{path.relative_to(root.parent)}:{node.lineno}: "
                                     f"import of {names[0]} inside a function")
        graph[mod] = {n: line for n, line in edges.items() if n != mod}
    return graph, misplaced


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(root: Path) -> list[str]:
    graph, misplaced = imports_of(root)
    problems = list(misplaced)
    for mod, edges in graph.items():
        for target, line in edges.items():
            a, b = _part(mod), _part(target)
            if a == b:
                continue
            if a not in LAYERS or b not in LAYERS:
                problems.append(f"{mod}: part {a if a not in LAYERS else b!r} has no layer")
            elif LAYERS[b] >= LAYERS[a] and target != root.name:
                problems.append(f"{mod} (line {line}) imports {target}: {a} is layer {LAYERS[a]}, "
                                f"{b} layer {LAYERS[b]}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (or a module
    importing itself), found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in graph.get(m, {}):
            if n not in graph:
                continue
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_package_is_layered_without_cycles():
    graph, _ = imports_of(PACKAGE)
    assert len(graph) > 40 and any(graph.values())       # the checker saw the package
    assert layer_violations(PACKAGE) == []


def test_every_part_has_a_layer_and_says_so():
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert parts <= set(LAYERS)
    for part in parts:     # each subpackage's docstring says what it may import
        doc = ast.get_docstring(ast.parse((PACKAGE / part / "__init__.py").read_text())) or ""
        assert f"Layer {LAYERS[part]}" in doc, part


@pytest.mark.parametrize("where,line,expect", [
    ("core/affinity.py", "from ..stages.run_dir import Run\n", "core is layer 0"),
    ("data/shards.py", "from ..nets.models import Classifier\n", "data is layer 2, nets layer 2"),
    ("stages/label_pool.py", "from ..pipeline import run_stage\n", "stages is layer 4"),
    ("engine/loop.py", "from ..stages import table\n", "engine is layer 3"),
    ("core/cam.py", "def f():\n    from .random_walk import random_walk\n", "inside a function"),
    ("stages/table.py", "def f():\n    from .run_dir import Run\n", "inside a function"),
    ("cli/arguments.py", "def f():\n    import yaml\n", "import of yaml inside a function"),
    ("core/affinity.py", "def f():\n    import yaml\n", "import of yaml inside a function"),
    ("core/affinity.py", "from .cam import cam_to_label\n", "import cycle"),
])
def test_checker_fails_on_a_back_edge(tmp_path, where, line, expect):
    copy = tmp_path / "psa_dist"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(copy) == []
    with open(copy / where, "a") as f:
        f.write("\n" + line)
    problems = layer_violations(copy)
    assert any(expect in p for p in problems), problems


def test_cycle_finder_on_a_known_graph():
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}, "e": {}}
    assert [sorted(c[:-1]) for c in cycles(g)] == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_only_util_dist_touches_torch_distributed():
    """``util/dist.py`` owns the process group; the rest, ``core`` above all, takes its reductions
    from there (a ``core`` function stays a pure tensor function that tests call without DDP)."""
    touching = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                touching.append(str(path.relative_to(PACKAGE)))
    assert sorted(set(touching)) == ["util/dist.py"], touching


def test_the_command_lines_help_imports_no_torch():
    # `psa-dist --help` and the parser of every subcommand: torch, numpy and Ray stay unloaded
    code = ("import sys, contextlib, io\n"
            "from psa_dist.cli import build_parser\n"
            "p = build_parser()\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n"
            "        p.parse_args(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "assert 'train-cls' in out.getvalue() and 'bench' in out.getvalue()\n"
            "print(sorted(m for m in ('torch', 'numpy', 'ray') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"

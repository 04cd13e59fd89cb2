"""The layers CONTRIBUTING.md draws hold in the code: every import in mlx_sdft/, at module level or
inside a function, goes to a layer below the importing module's own, and no modules import each
other in a cycle. The layer block is read from CONTRIBUTING.md, so the map there stays true.
Measurements sit below the commands (jobs → measure, never back), and a job takes none from another.

    python -m pytest tests/test_layers.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "mlx_sdft"
# mlx_sdft/__init__.py loads OpenBLAS before anything imports MLX: the one import that goes up. It
# cannot close a cycle, because machine/blas.py imports nothing of the package (checked below).
PRELOAD = ("mlx_sdft", "mlx_sdft.machine.blas")


def layers() -> list[set[str]]:
    """CONTRIBUTING.md's layer block (after the `<!-- layers -->` marker), lowest layer first."""
    text = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\s*```\n(.*?)```", text, re.DOTALL)
    assert block, "CONTRIBUTING.md: no ``` block after <!-- layers -->"
    return [set(line.split()) for line in reversed(block.group(1).splitlines()) if line.strip()]


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own, for its __init__.py)."""
    found = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package `level` - 1 steps above this module's
                head = here.split(".")[: len(here.split(".")) - node.level + 1]
                base = ".".join(head + ([node.module] if node.module else []))
            targets = [
                f"{base}.{alias.name}" for alias in node.names
            ]  # a submodule, or a name in `base`
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rpartition(".")[0]
            if target in known and target != name:
                out.add(target)
    return out


def unit(module: str) -> str:
    """The part of the package a module belongs to: its subpackage, or the top-level module itself
    (`mlx_sdft` for the package's own __init__.py)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The groups of nodes that reach each other (strongly connected, more than one node)."""
    order, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in order:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    placed = set().union(*layers())
    units = {unit(m) for m in modules()}
    assert not units - placed, f"not in CONTRIBUTING.md's layers: {sorted(units - placed)}"
    assert not placed - units, (
        f"in CONTRIBUTING.md's layers but not in mlx_sdft/: {sorted(placed - units)}"
    )


def upward(edges: dict[str, set[str]]) -> list[str]:
    """The imports in `edges` that do not go down the layers, one line each."""
    rank = {u: i for i, layer in enumerate(layers()) for u in layer}
    return [
        f"{src} imports {dst} ({unit(dst)} is {'beside' if rank[unit(dst)] == rank[unit(src)] else 'above'} "
        f"{unit(src)})"
        for src, targets in edges.items()
        for dst in sorted(targets)
        if unit(dst) != unit(src) and rank[unit(dst)] >= rank[unit(src)] and (src, dst) != PRELOAD
    ]


def test_imports_only_go_down():
    wrong = upward(graph())
    assert not wrong, "imports that do not go down:\n" + "\n".join(wrong)


def test_measure_sits_below_the_commands():
    """jobs → measure, never back: a measurement that imported a job (or serve, or the CLI) is refused."""
    rank = {u: i for i, layer in enumerate(layers()) for u in layer}
    assert all(rank["measure"] < rank[above] for above in ("jobs", "serve", "cli"))
    assert any(
        unit(t) == "measure"
        for src, targets in graph().items()
        if unit(src) == "jobs"
        for t in targets
    )
    for above in ("mlx_sdft.jobs.evaluate", "mlx_sdft.serve.engine", "mlx_sdft.cli"):
        assert upward({"mlx_sdft.measure.task": {above}}) == [
            f"mlx_sdft.measure.task imports {above} ({unit(above)} is above measure)"
        ]


# A job imports from another job only what is the command's own behaviour: a command's entry point
# (`continual` runs `train`'s), the gate's decision (`learn` calls `check`) or `teach --rule`'s store
# step (`rules add` is that command), each by name: a whole job module would hide what is taken from
# it. Measurements, the gate's and the preflight's included, come from measure/.
ENTRY_POINTS = {"mlx_sdft.jobs.gate.check"}


def allowed(name: str) -> bool:
    return name.rpartition(".")[2].startswith("run_") or name in ENTRY_POINTS


def job_to_job(path: Path) -> list[str]:
    """What a jobs/ module imports from another jobs/ module, as dotted names."""
    own = "mlx_sdft.jobs." + path.stem
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from .evaluate import x` inside jobs/
                base = ".".join(
                    ["mlx_sdft", "jobs"][: 3 - node.level] + ([node.module] if node.module else [])
                )
            if base == "mlx_sdft.jobs" or base.startswith("mlx_sdft.jobs."):
                out += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            out += [alias.name for alias in node.names if alias.name.startswith("mlx_sdft.jobs.")]
    return [name for name in out if not name.startswith(own + ".") and name != own]


def test_jobs_take_measurements_from_measure_not_from_each_other():
    jobs = sorted((ROOT / PACKAGE / "jobs").glob("*.py"))
    wrong = [
        f"{path.name}: {name}" for path in jobs for name in job_to_job(path) if not allowed(name)
    ]
    assert not wrong, (
        "jobs that import another job's functions (a measurement goes in measure/):\n"
        + "\n".join(wrong)
    )


def test_job_to_job_sees_a_borrowed_measurement(tmp_path):
    path = tmp_path / "check.py"
    path.write_text(
        "from mlx_sdft.jobs.evaluate import perplexity, run_eval\nfrom mlx_sdft.jobs import gate\n"
        "from mlx_sdft.jobs.check import verdict\nfrom .continual import evaluate_stage\n"
        "from mlx_sdft.jobs.gate import check as gate_check, measure\nimport mlx_sdft.jobs.gate\n"
    )
    found = job_to_job(path)
    assert found == [
        "mlx_sdft.jobs.evaluate.perplexity",
        "mlx_sdft.jobs.evaluate.run_eval",
        "mlx_sdft.jobs.gate",
        "mlx_sdft.jobs.continual.evaluate_stage",
        "mlx_sdft.jobs.gate.check",
        "mlx_sdft.jobs.gate.measure",
        "mlx_sdft.jobs.gate",
    ]
    assert [allowed(name) for name in found] == [False, True, False, False, True, False, False]


def test_no_import_cycles():
    edges = graph()
    assert edges[PRELOAD[1]] == set(), (
        "machine/blas.py imports the package: the preload could close a cycle"
    )
    edges[PRELOAD[0]].discard(PRELOAD[1])
    packages = {}
    for src, targets in edges.items():
        packages.setdefault(unit(src), set()).update(
            unit(t) for t in targets if unit(t) != unit(src)
        )
    found = [f"modules {' ↔ '.join(c)}" for c in cycles(edges)] + [
        f"packages {' ↔ '.join(c)}" for c in cycles(packages)
    ]
    assert not found, "import cycles:\n" + "\n".join(found)


# Algorithm options, not a command's whole options class, cross into core (as mlx-lm's `train`
# takes `TrainingArgs`): the loss reads `objective.ObjectiveArgs`, the sampling budget
# `guards.Budget`, the loop `train.TrainingArgs`, each built from the options by its `of`.
def options_classes(path: Path) -> list[str]:
    """The options classes (`mlx_sdft.config`'s `...Config`) a module imports or names, and its
    functions' parameters named `cfg`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mlx_sdft.config"):
            found += [alias.name for alias in node.names if alias.name.endswith("Config")]
        elif isinstance(node, ast.Name) and node.id.endswith("Config"):
            found.append(node.id)
        elif isinstance(node, ast.Attribute) and node.attr.endswith("Config"):
            found.append(node.attr)
        elif isinstance(node, ast.arg) and node.arg == "cfg":
            found.append("cfg")
    return found


def test_core_reads_no_options_class():
    core = sorted((ROOT / PACKAGE / "core").glob("*.py"))
    wrong = [f"{path.name}: {name}" for path in core for name in options_classes(path)]
    assert not wrong, (
        "core modules that take a command's whole options (pass core's own args dataclass, "
        "built by its `of`):\n" + "\n".join(wrong)
    )


def test_options_classes_sees_a_config(tmp_path):
    path = tmp_path / "objective.py"
    path.write_text(
        "from mlx_sdft.config import PAPER_SDFT, Config\nimport mlx_sdft.config as config\n\n\n"
        "def loss(args: config.CheckConfig, cfg):\n    return Config\n"
    )
    assert sorted(options_classes(path)) == ["CheckConfig", "Config", "Config", "cfg"]

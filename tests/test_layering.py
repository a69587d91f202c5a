"""The package's import graph has no cycles (function-level imports included), and the layers
point one way: the command line imports the probes, never the other way round."""

from __future__ import annotations

import ast
from pathlib import Path

import genprobe

ROOT = Path(genprobe.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    """module -> genprobe modules it imports anywhere in its source (lazy imports too)."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module if node.level == 0 else _resolve(module, is_package, node.level, node.module)
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                # the deepest genprobe module that the name refers to
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module and name.startswith("genprobe"):
                    graph[module].add(name)
    return graph


def _package_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edges from a package's __init__ to its own submodules (re-exports, not layering)."""
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(_package_edges(import_graph()))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_the_command_line():
    graph = import_graph()
    offenders = sorted(m for m, deps in graph.items() if "genprobe.cli" in deps and m not in
                       ("genprobe.cli", "genprobe.__main__"))
    assert not offenders, f"modules importing genprobe.cli: {offenders}"


def _loaded_after(code: str) -> set[str]:
    """The heavy top-level packages a fresh interpreter has loaded after running `code`."""
    import subprocess
    import sys

    probe = (f"import sys\n{code}\nprint(' '.join(m for m in ('torch', 'pandas', 'scipy', "
             "'matplotlib', 'rich', 'genprobe.kernels', 'genprobe.report', 'genprobe.measures') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_genprobe_loads_only_what_is_used():
    """`import genprobe` loads no heavy package; `gp.Subject` needs torch alone; the probe
    registry adds pandas, never scipy, matplotlib, the kernels or the report."""
    assert _loaded_after("import genprobe") == set()
    assert _loaded_after("import genprobe as gp; gp.Subject") == {"torch"}
    assert _loaded_after("import genprobe as gp; gp.list_probes(); gp.robustness") == {"torch", "pandas"}


def test_lazy_names_resolve_to_the_functions_not_their_modules():
    import types

    import genprobe as gp
    import genprobe.evaluate  # noqa: F401 - binding the submodule must not hide gp.evaluate
    import genprobe.report  # noqa: F401

    assert callable(gp.report) and callable(gp.evaluate)
    assert not isinstance(gp.report, types.ModuleType) and not isinstance(gp.evaluate, types.ModuleType)
    assert isinstance(gp.kernels, types.ModuleType) and gp.NTKPhaseResult.__name__ == "NTKPhaseResult"
    assert {"robustness", "RobustnessResult", "Subject", "report"} <= set(gp.__all__)
    assert "robustness" in dir(gp)
    try:
        gp.__getattr__("no_such_name")
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:
        raise AssertionError("an unknown name resolved")


def test_the_options_layer_sits_below_the_engines_and_the_probes():
    """genprobe.options is what every probe, the kernels and the measures check their options
    with: it imports no engine and no probe, and the kernels borrow nothing from the probes."""
    graph = import_graph()
    below = graph["genprobe.options"]
    assert not any(d.startswith(("genprobe.engine", "genprobe.probes", "genprobe.kernels"))
                   for d in below), sorted(below)
    kernels = set().union(*(deps for m, deps in graph.items() if m.startswith("genprobe.kernels")))
    assert not any(d.startswith("genprobe.probes") for d in kernels), sorted(kernels)


def test_one_seed_derivation():
    """Every seeded draw outside the datasets comes from genprobe.seeds (which imports only the
    errors): a generator seeded by hand, or a SeedSequence built elsewhere, fails this test."""
    assert import_graph()["genprobe.seeds"] <= {"genprobe.errors"}
    hand = ("Generator().manual_seed", "SeedSequence(", "default_rng(", "np.random.seed(")
    found = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "seeds.py" or rel.startswith("data/"):  # the datasets' own documented streams
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(h in code for h in hand) and "seed_sequence(" not in code \
                    and not code.lstrip().startswith(("``", '"', "'")):
                found.append(f"{rel}:{no}: {line.strip()}")
    assert not found, found

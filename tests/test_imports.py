"""The package's imports form a one-way graph: no cycle, function-level imports included.

    python -m pytest -q tests/test_imports.py

Parses every module of gptcore (gptcore/, its kernels from kernels/ as gptcore.kernels, serve/,
io/) with ast, without importing anything, and collects every ``import`` / ``from ... import``
that names a module of the package wherever it stands (module level, inside a function, under
``if TYPE_CHECKING``). ``from gptcore.io import hf`` counts as importing gptcore.io.hf (not the
package's ``__init__``) when that is a module, ``from gptcore.io import load_model`` as importing
gptcore.io. A package's ``__init__`` is not an implicit edge of its submodules (Python runs it first,
but a submodule does not depend on it). Layers, bottom up: config -> kernels -> ops -> model -> io
-> runtime (train, generate, eval, serve, ...) -> CLIs.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"gptcore": ROOT / "gptcore", "gptcore.kernels": ROOT / "kernels"}


def package_modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in SOURCES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts]
            if pkg == "gptcore" and parts[0] == "kernels":
                continue  # not the installed kernels (a stray copy would shadow nothing)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([pkg, *parts])] = f
        for f in folder.rglob("*.so"):  # compiled extensions (gptcore._C): leaves of the graph
            rel = f.relative_to(folder)
            mods[".".join([pkg, *rel.parts[:-1], f.name.split(".")[0]])] = f
    return mods


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    if path.suffix != ".py":
        return set()
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in mods:
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)  # a submodule: the package's __init__ is not what is used
                elif target in mods:
                    out.add(target)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = package_modules()
    return {name: imports_of(name, path, mods) for name, path in mods.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each as a path."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_cycle_finder_finds_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(g) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_the_parser_sees_function_level_and_submodule_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from gptcore.io import hf\n    import gptcore.model\n")
    mods = {"gptcore.io": Path("x"), "gptcore.io.hf": Path("y"), "gptcore.model": Path("z"), "gptcore.m": f}
    assert imports_of("gptcore.m", f, mods) == {"gptcore.io.hf", "gptcore.model"}
    f.write_text("from gptcore.io import load_model\nfrom .io import hf\n")
    assert imports_of("gptcore.m", f, mods) == {"gptcore.io", "gptcore.io.hf"}


def test_no_import_cycle_in_the_package():
    graph = import_graph()
    assert "gptcore.io.formats" in graph and "gptcore.kernels.attention" in graph  # the scan sees the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (modules importing each other, directly or through others): " + \
        "; ".join(" <-> ".join(c) for c in cycles)


def _layer(mod: str) -> int:
    parts = mod.split(".")
    if mod == "gptcore.config":
        return 0
    if parts[1:2] == ["kernels"] or mod in ("gptcore.loss", "gptcore._ext", "gptcore._C"):
        return 1
    if mod == "gptcore.ops":
        return 2
    if mod == "gptcore.model":
        return 3
    if parts[1:2] == ["io"]:
        return 4
    return 5  # runtime and CLIs


def test_lower_layers_do_not_import_higher_ones():
    """config -> kernels -> ops -> model -> io -> runtime: no module imports one of a higher layer."""
    bad = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, ts in import_graph().items() for t in sorted(ts)
           if m != "gptcore" and _layer(t) > _layer(m)]
    assert not bad, bad

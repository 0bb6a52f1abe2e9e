"""The package's layering, read from the source: one direction, no cycles.

cli -> tools -> core -> ops -> kernels / _C (see ../README.md, Layout). Built from every
``import`` statement in fastgpt/ and kernels/ (``ast``, function bodies included), so an import
hidden inside a function to dodge a cycle counts like any other.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> import name (setup.py installs kernels/ as fastgpt.kernels)
PACKAGES = {ROOT / "fastgpt": "fastgpt", ROOT / "kernels": "fastgpt.kernels"}
# imported inside functions on purpose: fastgpt._C loads the C++ library (seconds, and it may be
# missing), fastgpt.kernels defines the Triton kernels, which must happen after TRITON_INTERPRET
# is settled and costs the import of triton
LAZY = ("fastgpt._C", "fastgpt.kernels")


def _modules() -> dict[str, Path]:
    found = {}
    for folder, name in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((name,) + parts)] = path
    return found


def _imports(module: str, path: Path, known: dict) -> list[tuple[str, int, bool]]:
    """(imported fastgpt module, line, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            if name == "fastgpt._C" or name.startswith("fastgpt."):
                out.append((name, node.lineno, id(node) in in_function))
    return out


def _graph():
    known = _modules()
    return known, {m: _imports(m, p, known) for m, p in known.items()}


def _is_tools(module: str) -> bool:
    return module == "fastgpt.tools" or module.startswith("fastgpt.tools.")


def test_the_graph_sees_the_package():
    known, graph = _graph()
    assert {"fastgpt.cli", "fastgpt.train", "fastgpt.ops.registry", "fastgpt.kernels.attention",
            "fastgpt.tools.check", "fastgpt.tools.bench.harness"} <= set(known)
    assert ("fastgpt.ops.registry", ) == tuple(
        m for m, _, _ in graph["fastgpt.ops.attention"] if m == "fastgpt.ops.registry")


def test_no_import_cycles():
    known, graph = _graph()
    edges = {m: sorted({t for t, _, _ in imps if t in known and t != m})
             for m, imps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_kernels_import_nothing_from_fastgpt():
    known, graph = _graph()
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items()
           if m.startswith("fastgpt.kernels") for t, line, _ in imps
           if not t.startswith("fastgpt.kernels")]
    assert not bad, bad


def test_only_cli_and_tools_import_tools():
    known, graph = _graph()
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items()
           if not _is_tools(m) and m != "fastgpt.cli" for t, line, _ in imps if _is_tools(t)]
    assert not bad, bad


def test_ops_import_only_ops_errors_device_kernels_and_the_extension():
    known, graph = _graph()
    # fastgpt.device (the hardware's name and flags; it imports nothing of fastgpt but errors)
    # names the signature measured dispatch caches choices under
    allowed = ("fastgpt.ops", "fastgpt.errors", "fastgpt.device", "fastgpt.kernels", "fastgpt._C")
    bad = [f"{m}:{line} imports {t}" for m, imps in graph.items()
           if m.startswith("fastgpt.ops") for t, line, _ in imps
           if not any(t == a or t.startswith(a + ".") for a in allowed)]
    assert not bad, bad


def test_no_function_local_imports_of_fastgpt_but_the_lazy_ones():
    known, graph = _graph()
    bad = [f"{m}:{line} imports {t} inside a function" for m, imps in graph.items()
           for t, line, local in imps
           if local and not any(t == a or t.startswith(a + ".") for a in LAZY)]
    assert not bad, bad


def test_functions_fit_in_a_reader_s_head():
    # about one screen: a longer function is several ideas that want names of their own
    limit = 80
    long = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, long

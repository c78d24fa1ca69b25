"""The package's layout: the modules of src/sleb import each other without cycles.

The graph is read from the source with `ast`, not by importing: an edge a -> b for every import of
b that runs when a is imported (a module's top level, including class bodies and top-level
if/try/with blocks; not imports inside functions, which run later, nor `if TYPE_CHECKING:` blocks).
`from . import x` and `from .x import y` are edges to x; a name imported from the package itself
(`from . import prune`, `from sleb import prune`, `import sleb`) is an edge to `__init__`, which
imports the public API, so such an import running back up to the package is a cycle.

A subpackage's modules are nodes of their own, named with a dot (`gguf_io.reader`; its
`__init__.py` is `gguf_io`), and importing one is also an edge to its subpackage, whose
`__init__` runs first. `remote_code/` is model code copied into outputs, not a module of the layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = "sleb"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE
INIT = "__init__"


def _top_level(body: list[ast.stmt]):
    """The import statements that run when the module body runs (recursing into blocks, not functions)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from _top_level(node.orelse)
        else:  # class bodies, if/try/with/for/while/match blocks
            blocks = [getattr(node, f, None) or [] for f in ("body", "orelse", "finalbody")]
            blocks += [part.body for part in (getattr(node, "handlers", None) or []) + (getattr(node, "cases", None) or [])]
            for block in blocks:
                yield from _top_level(block)


# Subpackages that are not modules of the layers: model code copied into outputs, standing alone.
DATA_PACKAGES = ("remote_code",)


def _with_packages(name: str, modules: set[str]) -> set[str]:
    """A module and the subpackages it lies in (their `__init__` runs first): gguf_io.reader -> gguf_io too."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules


def _longest_module(parts: list[str], modules: set[str]) -> str | None:
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in modules:
            return ".".join(parts[:i])
    return None


def _targets(node: ast.Import | ast.ImportFrom, modules: set[str], package: list[str]) -> set[str]:
    """The package modules an import statement in a module of (sub)package `package` runs."""
    found = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[0] == PACKAGE:
                module = _longest_module(parts[1:], modules)
                found |= _with_packages(module, modules) if module else {INIT}
        return found
    if node.level == 0 and (node.module or "").split(".")[0] != PACKAGE:
        return set()  # a third-party or standard-library import
    if node.level:
        assert node.level - 1 <= len(package), f"an import above {PACKAGE}: {ast.unparse(node)}"
        base = package[:len(package) - (node.level - 1)]
        parts = base + (node.module.split(".") if node.module else [])
    else:
        parts = node.module.split(".")[1:]
    if parts and parts[0] in DATA_PACKAGES:
        return set()
    if not parts:  # from . import x, y (in the package itself): modules where they are, its own names otherwise
        return {alias.name if alias.name in modules else INIT for alias in node.names}
    module = _longest_module(parts, modules)
    assert module is not None, f"an import of a module that is not in {PACKAGE}: {ast.unparse(node)}"
    found |= _with_packages(module, modules)
    if module == ".".join(parts):  # from .sub import m: m is a module of the subpackage
        for alias in node.names:
            found |= _with_packages(f"{module}.{alias.name}", modules)
    return found


def _every_import(body: list[ast.stmt]):
    """Every import statement, inside functions too (a deferred import is still a dependency)."""
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Module name -> file: `export` (src/sleb/export.py), `gguf_io.reader`, `gguf_io` (its __init__.py),
    `__init__` (the package's own)."""
    files = {}
    for path in sorted(src.rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[0] in DATA_PACKAGES:
            continue
        if len(parts) > 1 and parts[-1] == INIT:
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_graph(src: Path = SRC, *, inside_functions: bool = False) -> dict[str, set[str]]:
    """Module name -> the package modules it imports at import time (with `inside_functions`, also those
    its functions import when they run)."""
    files = module_files(src)
    modules = set(files)
    imports = _every_import if inside_functions else _top_level
    graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        # The (sub)package a relative import starts from: a subpackage's __init__ is in its own package.
        package = name.split(".") if path.name == "__init__.py" and name != INIT else name.split(".")[:-1]
        targets = set().union(*(_targets(node, modules, package) for node in imports(tree.body)))
        graph[name] = targets & modules - {name}
    return graph


# The package's layers, bottom first (the README's layout lists the modules in this order). A module
# imports only modules listed before it, at its top or inside a function: nothing runs back up.
LAYERS = {
    "foundations": ["errors", "progress", "ledger", "settings", "arch", "data", "sizes", "timing", "fingerprint",
                    "distributed"],
    "units, results and files": ["units", "result", "runfile", "outputs", "writer", "loading"],
    "score and search": ["scoring", "racing", "refine", "greedy", "criteria", "search", "compensate",
                         "compensated_search", "budgets"],
    "edit and export": ["export", "gguf_io", "gguf_io.reader", "gguf_io.pruned", "gguf_io.from_hf", "gguf_io.deci",
                        "decilm", "quantize", "saver"],
    "evaluate, heal, benchmark, draw": ["evaluate", "heal", "llamacpp_bench", "llamacpp_costs", "bench", "plots"],
    "jobs": ["config", "eval_table", "frontier", "compare", "report", "pipeline"],
    "command line": ["cli", "__main__", INIT],
}
ORDER = [module for layer in LAYERS.values() for module in layer]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path [a, b, ..., a], or None for an acyclic graph (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_is_read_from_the_source(tmp_path):
    (tmp_path / "__init__.py").write_text("from .a import f\n")
    (tmp_path / "a.py").write_text(
        "from __future__ import annotations\nimport os\nfrom typing import TYPE_CHECKING\n"
        "from . import b, helper_name\nfrom .c import g as h\n"
        "if TYPE_CHECKING:\n    from .d import T\n"
        "try:\n    from .e import x\nexcept ImportError:\n    pass\n"
        "class K:\n    from sleb.f import y\n"
        "def late():\n    from .g import z\n")
    for stem in "bcdefg":
        (tmp_path / f"{stem}.py").write_text("")
    assert import_graph(tmp_path)["a"] == {"b", INIT, "c", "e", "f"}
    assert import_graph(tmp_path)[INIT] == {"a"}


def test_a_subpackage_s_modules_are_nodes_of_their_own(tmp_path):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "__init__.py").write_text("from . import m\n")
    (tmp_path / "sub" / "m.py").write_text("from ..a import f\nfrom .n import g\nfrom .. import b\n")
    (tmp_path / "sub" / "n.py").write_text("def late():\n    from sleb.sub import m\n")
    (tmp_path / "a.py").write_text("from .sub import m\nimport sleb.sub.n\n")
    (tmp_path / "b.py").write_text("from .sub.n import g\nfrom .remote_code.model import M\n")
    (tmp_path / "remote_code").mkdir()
    (tmp_path / "remote_code" / "model.py").write_text("from .config import C\n")
    graph = import_graph(tmp_path)
    assert sorted(graph) == [INIT, "a", "b", "sub", "sub.m", "sub.n"]  # remote_code/ is no module of the layers
    assert graph["sub"] == {"sub.m"} and graph["sub.m"] == {"a", "sub", "sub.n", "b"}
    assert graph["a"] == {"sub", "sub.m", "sub.n"} and graph["b"] == {"sub", "sub.n"}
    assert graph["sub.n"] == set() and import_graph(tmp_path, inside_functions=True)["sub.n"] == {"sub", "sub.m"}


def test_find_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": {"y2"}, "y2": {"y"}}) == ["y", "y2", "y"]


def test_no_import_cycles():
    graph = import_graph()
    assert {"criteria", "search", "cli", INIT} <= set(graph)  # the package was found
    assert "search" in graph[INIT] and "criteria" in graph["search"]  # and its edges
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"
    # No module imports the package's own top level (which imports the public API, i.e. most modules).
    back_up = sorted(m for m, targets in graph.items() if INIT in targets)
    assert back_up == [], f"modules importing names from sleb/__init__: {back_up}"


def test_the_criteria_registry_is_complete_without_the_search_module():
    """`sleb.criteria` registers every criterion itself, `sleb` included, without importing `sleb.search`
    (the dispatcher above it).

    In a fresh interpreter whose `sleb` package is a bare stand-in for this src/sleb (its
    `__init__`, which imports everything, does not run): only `sleb.criteria` and what it imports load.
    """
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("sleb")
        package.__path__ = [{str(SRC)!r}]
        sys.modules["sleb"] = package
        from sleb.criteria import get_criterion
        criterion = get_criterion("metric3")
        assert criterion.name == "sleb" and criterion.stepwise, criterion
        assert "sleb.search" not in sys.modules, "importing sleb.criteria imported sleb.search"
        import sleb.greedy  # the step-wise criterion is sleb.greedy's, imported by the registry itself
        assert criterion.run is sleb.greedy.greedy_sleb
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1:] == ["ok"], proc.stderr[-3000:]


def test_imports_only_point_down_the_layers():
    """Counting imports inside functions: every module of src/sleb has its place in LAYERS, and imports
    only modules below it (so there is no cycle, hidden or not)."""
    graph = import_graph(inside_functions=True)
    assert sorted(graph) == sorted(ORDER), "a module is missing from LAYERS (or LAYERS names one that is gone)"
    upward = [f"{a} -> {b}" for a in ORDER for b in sorted(graph[a]) if ORDER.index(b) > ORDER.index(a)]
    assert upward == [], f"imports that run back up the layers: {upward}"
    assert find_cycle(graph) is None


def test_the_readme_layout_lists_the_modules_in_layer_order():
    readme = (SRC.parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    # `  export.py ...`, `  gguf_io/reader.py ...`; a subpackage's `  gguf_io/__init__.py` is `gguf_io`.
    listed = [line.split()[0].removesuffix(".py").removesuffix("/__init__").replace("/", ".")
              for line in block.splitlines()
              if line.startswith("  ") and not line.startswith("   ") and line.split()[0].endswith(".py")]
    assert listed == [m for m in ORDER], listed


def test_no_test_file_imports_another():
    """Helpers shared by test files live in tests/helpers.py (fixtures in conftest.py), so each test file can
    be read, run and changed on its own."""
    tests = Path(__file__).resolve().parent
    names = {p.stem for p in tests.glob("test_*.py")}
    found = []
    for path in sorted(tests.glob("*.py")):
        for node in _every_import(ast.parse(path.read_text(encoding="utf-8")).body):
            targets = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module or ""] if node.level == 0 else [])
            found += [f"{path.name}: {ast.unparse(node)}" for t in targets if t.split(".")[0] in names
                      or t.startswith("tests.")]
    assert found == [], f"test files importing test files: {found}"


def test_only_the_unit_strategy_names_unit_kinds():
    """Code outside `sleb.units` asks the unit kind (`unit_kind(name)`) instead of comparing unit names
    (`sleb.settings` may: it checks a setting's own value below the strategy)."""
    import re

    compare = re.compile(r"""[!=]=\s*["'](block|sublayer|attention)["']|["'](block|sublayer|attention)["']\s*[!=]=""")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name in ("units.py", "settings.py") or "remote_code" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if compare.search(line) and not line.lstrip().startswith("#"):
                found.append(f"{path.relative_to(SRC)}:{number}: {line.strip()}")
    assert found == [], found

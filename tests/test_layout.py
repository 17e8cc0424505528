"""The package's import graph has no cycle: config at the bottom, the modules that own each rule
above it, validation (which only runs their checks) above those, cli and trainer on top. Counts
function-level (lazy) imports too: a lazy import hides a cycle from Python, not from a reader.
Parsed with ast; nothing is imported."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "relora_dist"

# Edges left out of the graph on purpose, each with the reason; delete an entry once its edge is gone.
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _owner(name: str, mods: dict[str, Path]) -> str | None:
    """The module a dotted name lives in (itself, or the nearest module/package above it)."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """{module: modules it imports}, for every relora_dist module. Importing a.b.c also runs the
    __init__ of a.b: that edge counts, except into a package the importer itself belongs to (the
    package is initialised before its own modules) and into the bare relora_dist root."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import: resolve against this module's package
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([node.module] if node.module else []))
                names = [f"{base}.{a.name}" for a in node.names]
                # `from pkg import module` imports the module; `from module import name` the module.
                targets.update(n if n in mods else base for n in names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        deps = set()
        for target in targets:
            if not target.startswith("relora_dist"):
                continue
            owner = _owner(target, mods)
            while owner and owner != "relora_dist":
                if owner in mods and not (name == owner or name.startswith(owner + ".")):
                    deps.add(owner)
                owner = owner.rpartition(".")[0]
        graph[name] = {d for d in deps if (name, d) not in KNOWN_EXCEPTIONS}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_known_exceptions_are_real_edges():
    """An exception whose edge no longer exists is stale: delete it so the test guards that edge too."""
    mods = _modules()
    for importer, imported in KNOWN_EXCEPTIONS:
        assert importer in mods and imported in mods, (importer, imported)
        source = mods[importer].read_text()
        assert imported in source, f"{importer} no longer imports {imported}: delete its KNOWN_EXCEPTIONS entry"


def test_config_sits_at_the_bottom():
    """config imports no other relora_dist module except resources, so every owner may import it."""
    assert import_graph()["relora_dist.config"] <= {"relora_dist.resources"}


def test_the_detector_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_folders_keep_their_floors():
    """The folders show the architecture only while their edges hold: ReLoRA's own modules
    (relora/) know nothing of how a run is saved (checkpoint/ builds on them, not the reverse), and
    the benchmark harness (bench/) is a leaf that no package module imports: it measures the
    engine from outside, through the same calls a run makes."""
    graph = import_graph()
    for importer, deps in graph.items():
        if importer.startswith("relora_dist.relora."):
            assert not {d for d in deps if d.startswith("relora_dist.checkpoint")}, importer
        if not importer.startswith("relora_dist.bench"):
            assert not {d for d in deps if d.startswith("relora_dist.bench")}, importer


def test_the_top_level_is_the_entry_layer():
    """Only entry points and what every floor shares sit at the package's top level; everything
    else lives in the folder that names its part of the system (README's Layout section)."""
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == ["cli", "config", "model", "resources", "trainer", "validation"], top


def test_readme_layout_matches_the_tree():
    """README's Layout section names every folder and top-level module of the package, and every
    `relora_dist/...` path it names exists."""
    readme = (PACKAGE.parent / "README.md").read_text()
    section = readme[readme.index("## Layout\n"):readme.index("## Tests\n")]
    import re

    named = set(re.findall(r"`(relora_dist/[\w/.]+)`", section))
    for path in named:
        assert (PACKAGE.parent / path).exists(), f"README's Layout names {path}, which does not exist"
    entries = {f"relora_dist/{p.name}" + ("/" if p.is_dir() else "") for p in PACKAGE.iterdir()
               if not p.name.startswith(("_", ".")) and (p.is_dir() or p.suffix == ".py")}
    entries -= {"relora_dist/assets/", "relora_dist/configs/", "relora_dist/ds_configs/"}  # named bare in one row
    missing = sorted(e for e in entries if e not in named)
    assert not missing, f"README's Layout misses {missing}"

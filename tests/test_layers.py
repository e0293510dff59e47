"""The package's layers: each module imports only from its own layer or the ones below, and no
import circle exists. The imports are counted as the dep-closure test counts them
(tests/import_graph.py: function-level and type-only imports included), because DVC reruns a
stage on any file it imports. docs/architecture.md says what each layer is for."""

import import_graph
from import_graph import SRC, imported_modules

# Lowest first. A module's layer is that of the longest prefix of its name listed here.
LAYERS = (
    (
        "core",
        (
            "llmpipe",
            "llmpipe.errors",
            "llmpipe.layout",
            "llmpipe.io",
            "llmpipe.runtime",
            "llmpipe.params",
            "llmpipe.stage",
        ),
    ),
    ("data", ("llmpipe.data",)),
    ("model", ("llmpipe.model",)),
    ("evaluation", ("llmpipe.evaluation",)),
    ("train", ("llmpipe.train", "llmpipe.export")),
    ("rl", ("llmpipe.rl",)),
    ("task", ("llmpipe.task",)),
    (
        "commands",
        (
            "llmpipe.pipeline",
            "llmpipe.serve",
            "llmpipe.compare",
            "llmpipe.control",
            "llmpipe.launch",
            "llmpipe.preset",
            "llmpipe.seeds",
            "llmpipe.share",
            "llmpipe.smoke",
            "llmpipe.params.__main__",
        ),
    ),
)
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}
MAX_TOP_LEVEL_FILES = 13  # the core and the commands: anything else lives in a family


def module_name(path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in RANK:
            return RANK[".".join(parts[:i])]
    raise AssertionError(f"{module}: in no layer (add it to LAYERS)")


def import_graph_of_package() -> dict[str, set[str]]:
    return {
        module_name(path): imported_modules(path) - {module_name(path)}
        for path in sorted((SRC / "llmpipe").rglob("*.py"))
    }


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if layer(target) > layer(module)
    ]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each once (as found by a depth-first search)."""
    found, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_from_a_layer_above_it():
    assert upward_imports(import_graph_of_package()) == []


def test_there_is_no_import_circle():
    assert cycles(import_graph_of_package()) == []


def test_the_checks_find_an_upward_import_and_a_circle():
    graph = import_graph_of_package()
    graph["llmpipe.data.chat"] = graph["llmpipe.data.chat"] | {"llmpipe.rl.rlhf"}
    assert upward_imports(graph) == ["llmpipe.data.chat (data) imports llmpipe.rl.rlhf (rl)"]
    assert ["llmpipe.data.chat", "llmpipe.rl.rlhf", "llmpipe.data.chat"] in cycles(graph)


def test_the_package_root_holds_at_most_thirteen_files():
    files = sorted(path.name for path in (SRC / "llmpipe").glob("*.py"))
    assert len(files) <= MAX_TOP_LEVEL_FILES, files


def test_function_level_and_relative_imports_count(tmp_path, monkeypatch):
    # scores imports the decoder only inside a function
    scores = import_graph.SRC / "llmpipe/evaluation/scores.py"
    assert "llmpipe.model.decoding" in import_graph.imported_modules(scores)
    package = tmp_path / "src/llmpipe/sub"
    package.mkdir(parents=True)
    for name in ("__init__.py", "io.py", "layout.py"):
        (package.parent / name).write_text("")
    (package / "__init__.py").write_text("from .part import f\nfrom .. import layout\n")
    (package / "part.py").write_text("def f():\n    from ..io import write_json\n")
    monkeypatch.setattr(import_graph, "SRC", tmp_path / "src")
    assert import_graph.imported_modules(package / "__init__.py") == {
        "llmpipe",
        "llmpipe.sub",
        "llmpipe.sub.part",
        "llmpipe.layout",
    }
    assert import_graph.imported_modules(package / "part.py") == {"llmpipe", "llmpipe.io"}

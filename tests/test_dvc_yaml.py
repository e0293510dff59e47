"""dvc.yaml tells DVC what each stage depends on and writes; these tests keep it true.

- Code: each stage's command runs its script, and its import closure inside llmpipe (the stage
  script and every project module it imports, transitively, function-level imports included)
  is exactly what its deps cover.
- Data: each stage's data deps and outputs are the ones llmpipe.layout declares for it.
- Params: each stage declares its own section, and `seed` when its script reads it; no value
  comes from a code default that params.yaml does not spell out.

Each check is a function that returns the problems it finds, so the tests also show that it
fails on a dvc.yaml, layout or params.yaml with one line taken out.
"""

import ast
import copy
import dataclasses
import typing
from pathlib import Path

import pytest
from import_graph import file_closure, import_closure
from ruamel.yaml import YAML

from conftest import ROOT
from llmpipe import layout
from llmpipe.params import read_params_file
from llmpipe.pipeline import STAGE_SCHEMAS

CODE_ROOTS = ("src/", "stages/")
# Every stage's command: stages/<stage>.py under this machine's executor (llmpipe.launch).
ENTRY_POINT = "python -m llmpipe.launch {stage}"
LAUNCH = "src/llmpipe/launch/"
# Files that ship beside a module and that it reads: a stage importing the module depends on them.
READS_BESIDE = {"src/llmpipe/evaluation/harness.py": ("src/llmpipe/evaluation/harness_tasks",)}


def read_dvc_yaml() -> dict:
    return YAML(typ="safe").load((ROOT / "dvc.yaml").read_text())


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def _paths(entries) -> list[str]:
    """dvc.yaml's list of paths, some of them {path: options} mappings."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or ()]


def code_dep_problems(dvc: dict) -> list[str]:
    problems = []
    for stage, spec in dvc["stages"].items():
        if spec["cmd"] != ENTRY_POINT.format(stage=stage):
            problems.append(f"{stage}: its cmd does not run stages/{stage}.py")
        deps = [d for d in _paths(spec.get("deps")) if d.startswith(CODE_ROOTS)]
        closure = import_closure(stage)
        closure |= {data for file in closure for data in READS_BESIDE.get(file, ())}
        problems += [
            f"{stage}: imports {file}, which dvc.yaml does not list in its deps"
            for file in sorted(closure)
            if not any(_covers(d, file) for d in deps)
        ]
        problems += [
            f"{stage}: dvc.yaml lists {dep}, which the stage never imports"
            for dep in deps
            if not any(_covers(dep, file) for file in closure)
        ]
    return problems


def layout_problems(dvc: dict, stages: dict[str, layout.StageFiles]) -> list[str]:
    problems = []
    if set(dvc["stages"]) != set(stages):
        problems.append(f"stages: dvc.yaml has {sorted(dvc['stages'])}, layout {sorted(stages)}")
    for stage, files in stages.items():
        spec = dvc["stages"].get(stage, {})
        declared = {
            "data deps": {d for d in _paths(spec.get("deps")) if not d.startswith(CODE_ROOTS)},
            "outs": set(_paths(spec.get("outs")))
            | set(_paths(spec.get("metrics")))
            | set(_paths(spec.get("plots"))),
        }
        expected = {
            "data deps": {p.as_posix() for p in files.reads},
            "outs": {p.as_posix() for p in (*files.writes, *files.git_outputs(stage))},
        }
        for kind in declared:
            for path in sorted(declared[kind] - expected[kind]):
                problems.append(f"{stage}: dvc.yaml {kind} has {path}, layout does not")
            for path in sorted(expected[kind] - declared[kind]):
                problems.append(f"{stage}: layout {kind} has {path}, dvc.yaml does not")
    return problems


def _reads_seed(stage: str) -> bool:
    tree = ast.parse((ROOT / "stages" / f"{stage}.py").read_text())
    return any(isinstance(node, ast.Attribute) and node.attr == "seed" for node in ast.walk(tree))


def params_dep_problems(dvc: dict) -> list[str]:
    problems = []
    for stage, spec in dvc["stages"].items():
        declared = {
            key
            for entry in spec.get("params", ())
            for key in (entry if isinstance(entry, dict) else [entry])
        }
        if "params.yaml" in declared:  # the whole file: it covers every key
            continue
        expected = {stage} | ({"seed"} if _reads_seed(stage) else set())
        problems += [
            f"{stage}: reads params {key}, which dvc.yaml does not list"
            for key in sorted(expected - declared)
        ]
        problems += [
            f"{stage}: dvc.yaml lists params {key}, which the stage does not read"
            for key in sorted(declared - expected)
        ]
    return problems


def untracked_defaults(schema: type, raw: dict, prefix: str) -> list[str]:
    """Keys of `schema` (nested sections too) that params.yaml leaves to a code default."""
    missing = []
    hints = typing.get_type_hints(schema)
    for field in dataclasses.fields(schema):
        key = f"{prefix}.{field.name}"
        if field.name not in raw:
            missing.append(key)
            continue
        nested = [
            t
            for t in (hints[field.name], *typing.get_args(hints[field.name]))
            if dataclasses.is_dataclass(t)
        ]
        if nested and isinstance(raw[field.name], dict):
            missing += untracked_defaults(nested[0], raw[field.name], key)
    return missing


def params_problems(raw: dict) -> list[str]:
    return [
        key
        for stage, schema in STAGE_SCHEMAS.items()
        for key in untracked_defaults(schema, raw.get(stage, {}), stage)
    ]


# --- the project as it is ------------------------------------------------------------------


def test_every_stage_depends_on_exactly_the_code_it_imports():
    assert code_dep_problems(read_dvc_yaml()) == []


def test_every_stage_depends_on_exactly_the_params_it_reads():
    assert params_dep_problems(read_dvc_yaml()) == []


def test_dvc_yaml_agrees_with_the_layout():
    assert layout_problems(read_dvc_yaml(), layout.STAGES) == []


def test_params_yaml_spells_out_every_key_of_the_schema():
    assert params_problems(read_params_file(ROOT / "params.yaml")) == []


def test_the_schema_has_no_code_defaults():
    """A default in the schema would be a value DVC does not track (it reads params.yaml)."""

    def defaults(schema: type, prefix: str) -> list[str]:
        found = []
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                found.append(f"{prefix}.{f.name}")
            for t in (hints[f.name], *typing.get_args(hints[f.name])):
                if dataclasses.is_dataclass(t):
                    found += defaults(t, f"{prefix}.{f.name}")
        return found

    assert "pretrain.model.n_layer" in [  # nested sections are reached
        key for key in untracked_defaults(STAGE_SCHEMAS["pretrain"], {"model": {}}, "pretrain")
    ]

    assert [key for stage, schema in STAGE_SCHEMAS.items() for key in defaults(schema, stage)] == []


def test_the_report_plots_the_curves_of_every_stage_that_writes_them():
    from llmpipe.evaluation.report import CURVES

    assert [stage for stage, _, _ in CURVES] == [
        stage for stage, files in layout.STAGES.items() if files.curves
    ]


def test_evaluate_measures_models_and_the_report_only_renders():
    """A task param or a new perf timing reruns the report, not the measurement: evaluate
    reads the models and the data they are scored on, no metrics file, no task output and only
    its own params; the report reads no model."""
    stages = read_dvc_yaml()["stages"]
    evaluate = _paths(stages["evaluate"]["deps"])
    assert not [d for d in evaluate if d.startswith(("metrics/", "dvclive/", "data/task"))]
    assert stages["evaluate"]["params"] == ["seed", "evaluate"]
    assert not [d for d in _paths(stages["report"]["deps"]) if d.endswith("/model")]


# --- each check fails on one line taken out ------------------------------------------------


def test_where_a_stage_runs_is_no_dep_of_it():
    """The entry point starts the stage's script unchanged and is in no stage's deps, so that
    moving a stage to torchrun or Slurm reruns nothing: it imports nothing of llmpipe but its
    errors, layout and the stage entry points' helpers, which are every stage's deps anyway."""
    closure = file_closure(ROOT / LAUNCH / "__main__.py")
    imported = {f for f in closure if not f.startswith(LAUNCH)}
    assert imported == {
        "src/llmpipe/__init__.py",
        "src/llmpipe/errors.py",
        "src/llmpipe/layout.py",
        "src/llmpipe/stage.py",
    }
    for stage, spec in read_dvc_yaml()["stages"].items():
        assert not any(d.startswith(LAUNCH) for d in _paths(spec.get("deps"))), stage
        assert imported <= set(_paths(spec.get("deps"))), stage
        assert not any(f.startswith(LAUNCH) for f in import_closure(stage)), stage


@pytest.mark.parametrize(
    ("changed", "rerun"),
    [
        ("tokenize", "every stage but download"),
        ("reinforce", {"gguf", "evaluate", "report"}),
        ("task_reinforce", {"report"}),
    ],
)
def test_an_experiment_reruns_the_stages_downstream_of_what_it_changed(changed, rerun):
    """DVC reruns a stage whose deps changed, so an experiment on one stage's params reruns the
    stages downstream of it in DVC's own graph of dvc.yaml, and nothing upstream. (The
    end-to-end experiment test runs one such experiment, on lora; it once ran these too: a
    tokenizer change is the whole chain again, 2.5 minutes.)"""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph  # edges from a stage to the stages it depends on
        stage = next(node for node in graph if node.addressing == changed)
        downstream = {node.addressing for node in nx.ancestors(graph, stage)}
    if rerun == "every stage but download":
        rerun = set(read_dvc_yaml()["stages"]) - {"download", "tokenize"}
    assert downstream == rerun


def test_a_missing_code_dep_is_named():
    dvc = read_dvc_yaml()
    dvc["stages"]["finetune"]["deps"].remove("src/llmpipe/io.py")
    assert code_dep_problems(dvc) == [
        "finetune: imports src/llmpipe/io.py, which dvc.yaml does not list in its deps"
    ]


def test_a_needless_code_dep_is_named():
    dvc = read_dvc_yaml()
    dvc["stages"]["download"]["deps"].append("src/llmpipe/export/quantization.py")
    assert code_dep_problems(dvc) == [
        "download: dvc.yaml lists src/llmpipe/export/quantization.py, which the stage never imports"
    ]


def test_a_stage_that_runs_another_script_or_misses_seed_is_named():
    dvc = read_dvc_yaml()
    dvc["stages"]["lora"]["cmd"] = "python -m stages.finetune"
    assert "lora: its cmd does not run stages/lora.py" in code_dep_problems(dvc)
    dvc["stages"]["finetune"]["params"].remove("seed")
    dvc["stages"]["download"]["params"].append("seed")
    assert params_dep_problems(dvc) == [
        "download: dvc.yaml lists params seed, which the stage does not read",
        "finetune: reads params seed, which dvc.yaml does not list",
    ]


@pytest.mark.parametrize("change", ["path", "dep"])
def test_a_changed_layout_path_is_named(change):
    stages = copy.deepcopy(layout.STAGES)
    if change == "path":
        stages["finetune"] = dataclasses.replace(
            stages["finetune"], writes=(Path("data/finetune/weights"),)
        )
        expected = [
            "finetune: dvc.yaml outs has data/finetune/model, layout does not",
            "finetune: layout outs has data/finetune/weights, dvc.yaml does not",
        ]
    else:
        stages["grpo"] = dataclasses.replace(stages["grpo"], reads=stages["grpo"].reads[:-1])
        expected = ["grpo: dvc.yaml data deps has data/rl_baseline, layout does not"]
    assert layout_problems(read_dvc_yaml(), stages) == expected


def test_a_params_key_left_to_a_code_default_is_named():
    raw = read_params_file(ROOT / "params.yaml")
    del raw["pretrain"]["beta2"]
    del raw["evaluate"]["sample"]["top_p"]
    assert params_problems(raw) == ["pretrain.beta2", "evaluate.sample.top_p"]


def test_the_files_a_module_reads_beside_it_are_where_it_reads_them():
    from llmpipe.evaluation.harness import TASKS_DIR

    assert READS_BESIDE == {
        "src/llmpipe/evaluation/harness.py": (
            TASKS_DIR.resolve().relative_to(ROOT.resolve()).as_posix(),
        )
    }

"""Every training stage on several processes (what the torchrun and accelerate executors start,
llmpipe.launch): N processes train, one writes, and the global batch (so the run) does not
depend on N. On CPU with gloo, one thread per process.

Each stage runs on copies of the same micro workspace: `python -m stages.<name>` with
grad_accum_steps 2 (or the global batch), then 2 processes with the same params
(`torchrun --nproc_per_node 2`; for finetune also `accelerate launch`). Tolerances: finetune,
lora and the reward model see the same data in the same order
and differ by float reassociation only (the all-reduce sums in another order): 1e-4 relative.
GRPO samples on every process with its own random stream (TRL seeds each device apart), so two
processes draw other completions than one: its process count is a param (grpo.processes), its
before-figures are equal exactly (measured once, by the main process), and the run's shape
(steps, completions per step) is equal.
"""

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, run, set_params, subprocess_env, toy_pairs
from llmpipe import layout

pytestmark = pytest.mark.slow

TWO_PROCESSES = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m"]
ONE_PROCESS = ["python", "-m"]
TIMEOUT_S = 300  # a hung process group fails the test instead of blocking the suite


def copy_workspace(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    shutil.copytree(source / "data", target / "data")
    shutil.copy2(source / "params.yaml", target / "params.yaml")
    return target


def run_stage(stage: str, launcher: list[str], workspace: Path):
    result = subprocess.run(
        [*launcher, f"stages.{stage}"],
        cwd=workspace,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{stage} under {launcher[0]} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def metrics_of(workspace: Path, stage: str) -> dict:
    return json.loads((workspace / layout.metrics_file(stage)).read_text())


def curve(workspace: Path, stage: str, name: str) -> dict[int, float]:
    """{step: value}; a step written twice (two writers) fails here."""
    lines = (workspace / layout.curves_dir(stage) / f"{name}.tsv").read_text().splitlines()
    rows = [(int(step), float(value)) for step, value in (line.split("\t") for line in lines[1:])]
    assert len({step for step, _ in rows}) == len(rows), lines
    return dict(rows)


@pytest.fixture(scope="module")
def launchers(tmp_path_factory) -> dict[str, list[str]]:
    """torchrun, and accelerate with the shipped FSDP config turned to 2 CPU processes (which
    accelerate runs as plain DDP on CPU: the config parses and launches, the sharding is not
    exercised; see ShardedTrainer below)."""
    import yaml  # PyYAML, as accelerate reads it (YAML 1.1: an unquoted no is false)

    config = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    config.update(num_processes=2, use_cpu=True, mixed_precision="no")
    path = tmp_path_factory.mktemp("accelerate") / "fsdp-cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return {
        "torchrun": TWO_PROCESSES,
        "accelerate": ["accelerate", "launch", "--config_file", str(path), "-m"],
    }


SINGLE_RUNS: dict[tuple, Path] = {}  # one process, once per stage and params


def one_and_two_processes(
    stage: str, source: Path, tmp_path: Path, params: dict, launcher: list[str], two_only=None
):
    """Runs the stage alone (once per module) and under `launcher` with 2 processes (with
    `two_only` params besides); returns both workspaces and the 2-process run's output."""
    key = (stage, str(source), tuple(sorted(params.items())))
    if key not in SINGLE_RUNS:
        workspace = copy_workspace(source, tmp_path / "one")
        set_params(workspace, params)
        run_stage(stage, ONE_PROCESS, workspace)
        SINGLE_RUNS[key] = workspace
    two = copy_workspace(source, tmp_path / "two")
    set_params(two, {**params, **(two_only or {})})
    return SINGLE_RUNS[key], two, run_stage(stage, launcher, two)


def assert_one_writer(result, summary: str) -> None:
    """The stage's closing line comes from the one process that writes, once."""
    assert result.stdout.count(summary) == 1, result.stdout


def assert_close(one: dict, two: dict, keys: list[str], rel: float = 1e-4) -> None:
    for key in keys:
        assert two[key] == pytest.approx(one[key], rel=rel, abs=1e-6), key


@pytest.fixture(scope="module")
def micro_rlhf(micro_pretrained, tmp_path_factory) -> Path:
    """A copy of the micro workspace whose pretrained model stands in for the finetuned one,
    with a toy preference set (enough pairs for several reward-model steps)."""
    from llmpipe.rl.preferences import GoldSpec, PreferenceSet

    workspace = copy_workspace(micro_pretrained, tmp_path_factory.mktemp("rlhf") / "ws")
    shutil.copytree(workspace / layout.PRETRAIN_MODEL, workspace / layout.FINETUNE_MODEL)
    pairs = {"train": toy_pairs(0, 64), "heldout": toy_pairs(1, 16)}
    prompts = {split: sorted({q["prompt"] for q in rows}) for split, rows in pairs.items()}
    fresh = [
        {"prompt": q["prompt"], "completions": [q["chosen"], q["rejected"]], "gold": [1.0, 0.0]}
        for q in pairs["heldout"]
    ]
    PreferenceSet(pairs, prompts, fresh, GoldSpec("vader", None)).write(
        workspace / layout.PREFERENCES
    )
    return workspace


# finetune under torchrun: tests/test_executors.py (through DVC, against the reproduced one).
@pytest.mark.parametrize(("stage", "launcher"), [("lora", "torchrun"), ("finetune", "accelerate")])
def test_finetune_and_lora_on_two_processes_match_one(
    stage, launcher, launchers, micro_pretrained, tmp_path
):
    # LoRA's dropout is off: each process draws its masks from its own random stream, so with
    # dropout two processes are a run as good as one, but not the same run.
    one, two, result = one_and_two_processes(
        stage,
        micro_pretrained,
        tmp_path,
        {
            f"{stage}.grad_accum_steps": 2,
            f"{stage}.max_steps": 10,
            f"{stage}.eval_interval": 5,
            **({"lora.dropout": 0.0} if stage == "lora" else {}),
        },
        launchers[launcher],
    )
    m1, m2 = metrics_of(one, stage), metrics_of(two, stage)
    assert m1["steps"] == m2["steps"] == 10 and m1["best_step"] == m2["best_step"]
    assert m1["base_val_perplexity"] == m2["base_val_perplexity"]  # measured once, alike
    assert_close(m1, m2, ["val_perplexity", "train_loss"])
    assert (m1["perf"]["processes"], m2["perf"]["processes"]) == (1, 2)
    assert curve(two, stage, "eval/loss") == pytest.approx(curve(one, stage, "eval/loss"), rel=1e-4)
    assert_one_writer(result, "val perplexity")
    model_dir = layout.FINETUNE_MODEL if stage == "finetune" else layout.LORA_MERGED
    assert (two / model_dir / "model.safetensors").exists()


def test_reward_model_on_two_processes_matches_one(micro_rlhf, tmp_path):
    one, two, result = one_and_two_processes(
        "reward_model",
        micro_rlhf,
        tmp_path,
        {"reward_model.batch_size": 8, "reward_model.epochs": 2},
        TWO_PROCESSES,
    )
    m1, m2 = metrics_of(one, "reward_model"), metrics_of(two, "reward_model")
    assert m1["train_pairs"] == m2["train_pairs"]
    assert_close(
        m1,
        m2,
        ["heldout_mean_margin", "heldout_accuracy", "train_accuracy", "gold_agreement_fresh"],
    )
    assert curve(two, "reward_model", "train/loss") == pytest.approx(
        curve(one, "reward_model", "train/loss"), rel=1e-4
    )
    assert_one_writer(result, "held-out accuracy")


@pytest.fixture(scope="module")
def micro_rlhf_with_reward_model(micro_rlhf, tmp_path_factory) -> Path:
    workspace = copy_workspace(micro_rlhf, tmp_path_factory.mktemp("grpo") / "ws")
    run(["python", "-m", "stages.reward_model"], workspace)
    run(["python", "-m", "stages.rl_baseline"], workspace)  # grpo's "before"
    return workspace


def test_grpo_on_two_processes_has_the_runs_shape(micro_rlhf_with_reward_model, tmp_path):
    one, two, result = one_and_two_processes(
        "grpo",
        micro_rlhf_with_reward_model,
        tmp_path,
        {"grpo.prompts_per_step": 2, "grpo.num_generations": 2, "grpo.max_steps": 2},
        TWO_PROCESSES,
        {"grpo.processes": 2},  # GRPO's count is a param: another run than one process's
    )
    m1, m2 = metrics_of(one, "grpo"), metrics_of(two, "grpo")
    assert m1["steps"] == m2["steps"] == 2
    before = [k for k in m1 if k.startswith("before_")]
    assert before and all(m1[k] == m2[k] for k in before)  # rl_baseline's, read by both
    # The same global batch: 2 prompts x 2 completions per step, split over the processes.
    assert list(curve(two, "grpo", "train/reward")) == list(curve(one, "grpo", "train/reward"))
    assert_one_writer(result, "gold_gain ")
    assert (two / layout.GRPO_MODEL / "samples.json").exists()


def test_a_global_batch_that_does_not_divide_is_a_one_line_error(micro_rlhf, tmp_path):
    workspace = copy_workspace(micro_rlhf, tmp_path / "ws")
    set_params(workspace, {"finetune.grad_accum_steps": 3})
    result = subprocess.run(
        [*TWO_PROCESSES, "stages.finetune"],
        cwd=workspace,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode != 0
    assert (
        "error: finetune.grad_accum_steps: 3 is not divisible by the 2 processes of the launcher"
    ) in result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_boxes(tmp_path: Path, micro_workspace: Path, params: dict) -> tuple[Path, Path]:
    """Two "boxes", each its own copy of the repository (separate directories), whose executor
    runs pretrain across both with one process each (as llmpipe.launch.skypilot sets it up)."""
    port = free_port()
    boxes = []
    for i in (0, 1):
        box = copy_workspace(micro_workspace, tmp_path / f"box{i}")
        shutil.rmtree(box / "data/pretrain", ignore_errors=True)  # the session's earlier run
        set_params(box, params)
        shutil.copy2(ROOT / "dvc.yaml", box / "dvc.yaml")  # the deps the boxes compare
        (box / ".llmpipe").mkdir()
        (box / ".llmpipe/executor.yaml").write_text(
            f"kind: torchrun\nprocesses: 1\nnodes: 2\nrdzv_endpoint: 127.0.0.1:{port}\n"
            "shared_filesystem: false\nrdzv_join_timeout_s: 120\n"
        )
        boxes.append(box)
    return boxes[0], boxes[1]


def launch_on_boxes(stage: str, boxes: tuple[Path, ...]) -> list[subprocess.CompletedProcess]:
    """`python -m llmpipe.launch <stage>` on every box at once, as each box's `dvc repro` does."""
    started = [
        subprocess.Popen(
            ["python", "-m", "llmpipe.launch", stage],
            cwd=box,
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for box in boxes
    ]
    try:
        outputs = [process.communicate(timeout=TIMEOUT_S)[0] for process in started]
    finally:
        for process in started:
            process.kill()
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out)
        for p, out in zip(started, outputs, strict=True)
    ]


def test_pretrain_across_two_boxes_with_their_own_copies_resumes_and_writes_on_both(
    micro_workspace, tmp_path, monkeypatch
):
    """Boxes without a shared file system (`shared_filesystem: false`): both train one run,
    resume it from a checkpoint, and each writes the same model and metrics into its own copy,
    equal to an uninterrupted run on one process (1e-4: the all-reduce sums in another order)."""
    from safetensors.torch import load_file

    import llmpipe.train.pretrain as module
    from llmpipe.params import load_stage_params
    from llmpipe.train.params import PretrainParams
    from llmpipe.train.pretrain import PretrainPaths

    params = {
        "pretrain.grad_accum_steps": 2,
        "pretrain.max_steps": 12,
        "pretrain.checkpoint_interval": 6,
    }
    reference = copy_workspace(micro_workspace, tmp_path / "reference")
    set_params(reference, params)
    run(["python", "-m", "stages.pretrain"], reference)

    box0, box1 = two_boxes(tmp_path, micro_workspace, params)
    # The run was interrupted after the step-6 checkpoint, which every box wrote (the process
    # count is no part of a run's identity: the global batch is the same).
    real_lr_at = module.lr_at
    monkeypatch.setattr(
        module,
        "lr_at",
        lambda s, q: (_ for _ in ()).throw(KeyboardInterrupt) if s == 8 else real_lr_at(s, q),
    )
    shared, p = load_stage_params(PretrainParams, box0 / "params.yaml")
    with pytest.raises(KeyboardInterrupt):
        module.pretrain(
            p,
            shared.seed,
            PretrainPaths(
                tokens_dir=box0 / layout.tokens("pretrain"),
                tokenizer_dir=box0 / layout.TOKENIZER,
                model_dir=box0 / layout.PRETRAIN_MODEL,
                checkpoint_dir=box0 / layout.PRETRAIN_CHECKPOINT,
                live_dir=box0 / layout.live_dir("pretrain"),
            ),
        )
    shutil.copytree(box0 / layout.PRETRAIN_CHECKPOINT, box1 / layout.PRETRAIN_CHECKPOINT)

    results = launch_on_boxes("pretrain", (box0, box1))
    assert [r.returncode for r in results] == [0, 0], [r.stdout[-3000:] for r in results]
    said = "".join(r.stdout for r in results)
    assert "--rdzv_conf join_timeout=120" in said and "at step 6" in said
    expected = metrics_of(reference, "pretrain")
    wa = load_file(reference / layout.PRETRAIN_MODEL / "model.safetensors")
    for box in (box0, box1):
        written = metrics_of(box, "pretrain")
        assert written["perf"]["processes"] == 2
        assert written["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-4)
        wb = load_file(box / layout.PRETRAIN_MODEL / "model.safetensors")
        # Adam's normalised steps let the reassociated sums move a weight whose gradient is
        # near 0 by about 1e-4 (1.5e-4 at most measured); the loss agrees to 1e-4 relative.
        assert all((wa[k] - wb[k]).abs().max() < 1e-3 for k in wa)
    assert (box0 / layout.PRETRAIN_MODEL / "model.safetensors").read_bytes() == (
        box1 / layout.PRETRAIN_MODEL / "model.safetensors"
    ).read_bytes()  # one run: the same weights on every process


@pytest.mark.parametrize(
    ("visible", "gpus_seen", "note"),
    [
        (None, "0", None),
        ("2,3", "2", "finetune: 2 GPUs visible, using the first"),
        ("5", "5", None),
    ],
)
def test_one_process_sees_one_gpu_and_says_so(monkeypatch, capsys, visible, gpus_seen, note):
    from llmpipe import stage

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(stage, "NVIDIA_GPUS", Path("/nonexistent"))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    stage.one_gpu_unless_launched("finetune")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == gpus_seen
    err = capsys.readouterr().err
    assert (note in err) if note else err == ""
    if note:
        assert "the executor decides how many a stage runs on" in err


class ShardedTrainer:
    """What runtime.trained_model reads of a Trainer under FSDP. accelerate runs an FSDP config
    as plain DDP on CPU, so the gather itself (accelerator.get_state_dict) is not exercised
    here: this checks what happens around it."""

    is_fsdp_enabled, is_deepspeed_enabled = True, False

    def __init__(self, state: dict):
        self.model = self.model_wrapped = object()  # sharded: the main process must not use it
        self.accelerator = type(
            "Accelerator",
            (),
            {"get_state_dict": lambda _, m: state if m is self.model_wrapped else None},
        )()


def test_a_sharded_runs_weights_are_gathered_into_a_rebuilt_model(monkeypatch, capsys):
    import torch

    from llmpipe.runtime import trained_model

    trained = torch.nn.Linear(3, 2)
    fresh = torch.nn.Linear(3, 2)
    assert not torch.equal(fresh.weight, trained.weight)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert trained_model(ShardedTrainer(trained.state_dict()), lambda: fresh) is None
    monkeypatch.setenv("RANK", "0")
    model = trained_model(ShardedTrainer(trained.state_dict()), lambda: fresh)
    assert model is fresh and torch.equal(model.weight, trained.weight)
    assert "gathered the FSDP-sharded weights of 2 processes" in capsys.readouterr().out


def test_vllm_generation_is_checked_before_anything_loads(monkeypatch):
    import dataclasses

    from llmpipe.errors import ParamsError
    from llmpipe.params import load_stage_params
    from llmpipe.rl.grpo import check_grpo_launch
    from llmpipe.rl.params import GrpoParams

    _, p = load_stage_params(GrpoParams, ROOT / "params.yaml")
    assert check_grpo_launch(p) == p.prompts_per_step * p.num_generations  # HF generate: fine
    with pytest.raises(ParamsError, match=r"^grpo\.use_vllm: true needs a CUDA GPU"):
        check_grpo_launch(dataclasses.replace(p, use_vllm=True))
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(
        ParamsError,
        match=r"^grpo\.use_vllm: true needs vLLM, which is not "
        r"installed \(pip install -e '\.\[gpu\]'\)",
    ):
        check_grpo_launch(dataclasses.replace(p, use_vllm=True))
    monkeypatch.setenv("WORLD_SIZE", "3")
    # GRPO's completions depend on the count: another count than params' is refused...
    with pytest.raises(ParamsError, match=r"^grpo\.processes: 1, but 3 processes run it"):
        check_grpo_launch(p)
    # ...and params' count must divide the step's completions.
    with pytest.raises(
        ParamsError,
        match=r"^grpo\.prompts_per_step: 8 prompts x 4 generations "
        r"= 32 completions is not divisible by the 3",
    ):
        check_grpo_launch(dataclasses.replace(p, processes=3))

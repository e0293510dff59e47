import dataclasses
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmpipe import layout
from llmpipe.data.tokens import EpochSampler
from llmpipe.errors import ParamsError
from llmpipe.model.gpt import GPT
from llmpipe.params import load_stage_params
from llmpipe.train.params import PretrainParams
from llmpipe.train.pretrain import (
    CHECKPOINT_FILE,
    PretrainPaths,
    TrainingError,
    build_model,
    checkpoint,
    evaluate,
    lr_at,
    optimizer_step,
    prepare,
    pretrain,
    setup_runtime,
)


def paths_in(workspace: Path, out: Path) -> PretrainPaths:
    return PretrainPaths(
        tokens_dir=workspace / layout.tokens("pretrain"),
        tokenizer_dir=workspace / layout.TOKENIZER,
        model_dir=out / "model",
        checkpoint_dir=out / "checkpoint",
        live_dir=out / "live",
    )


def micro_params(workspace: Path, **changes):
    shared, params = load_stage_params(PretrainParams, workspace / "params.yaml")
    return shared.seed, dataclasses.replace(params, **changes)


def without_perf(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "perf"}


def schedule(workspace, **changes) -> tuple[list[float], PretrainParams]:
    """The learning rate of 100 steps: 10 of warmup to 1.0, then down to min_lr 0.1."""
    _, p = micro_params(
        workspace, warmup_steps=10, max_steps=100, learning_rate=1.0, min_lr=0.1, **changes
    )
    return [lr_at(s, p) for s in range(100)], p


def test_cosine_schedule_warms_up_then_decays_to_min_lr(micro_workspace):
    lrs, p = schedule(micro_workspace, schedule="cosine")
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # decays from the top
    assert lr_at(100, p) == pytest.approx(0.1)


def test_wsd_schedule_holds_the_rate_then_decays_linearly_over_the_cooldown(micro_workspace):
    lrs, _ = schedule(micro_workspace, schedule="wsd", cooldown_fraction=0.2)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10:80] == [1.0] * 70  # stable
    steps = [a - b for a, b in zip(lrs[79:], lrs[80:], strict=False)]
    assert steps == pytest.approx([0.9 / 20] * 20)  # linear, down to min_lr at the last step
    assert lrs[-1] == pytest.approx(0.1)


def test_loss_falls_and_beats_the_unigram_baseline(micro_workspace, tmp_path):
    seed, p = micro_params(
        micro_workspace,
        max_steps=400,
        eval_interval=200,
        batch_size=16,
        checkpoint_interval=1000,
        learning_rate=3e-3,
        warmup_steps=10,
    )
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, n_embd=64, block_size=64))
    metrics = pretrain(p, seed, paths_in(micro_workspace, tmp_path))
    assert metrics["val_loss"] < math.log(512) - 1.5, metrics  # far below a uniform guess
    assert metrics["val_perplexity"] < 0.8 * metrics["unigram_val_perplexity"]
    curve = [
        float(line.split("\t")[-1])
        for line in (tmp_path / "live/plots/metrics/train/loss.tsv").read_text().splitlines()[1:]
    ]
    assert sum(curve[-10:]) / 10 < sum(curve[:10]) / 10 - 1.0
    # The export is a Hugging Face model with the tokenizer, and it has no leftover checkpoint.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert hf.config.vocab_size == len(tok) == 512
    assert not (tmp_path / "checkpoint" / CHECKPOINT_FILE).exists()


def test_same_seed_same_metrics_and_weights(micro_workspace, tmp_path):
    seed, p = micro_params(micro_workspace)
    first = pretrain(p, seed, paths_in(micro_workspace, tmp_path / "a"))
    second = pretrain(p, seed, paths_in(micro_workspace, tmp_path / "b"))
    assert without_perf(first) == without_perf(second)
    wa = load_file(tmp_path / "a/model/model.safetensors")
    wb = load_file(tmp_path / "b/model/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_interrupted_run_resumes_to_the_same_weights(
    micro_workspace, tmp_path, monkeypatch, optimizer
):
    # Dropout makes the RNG state matter. Without a declared peak (CPU), MFU is not given.
    # Muon's momentum lives in a second optimizer: the checkpoint holds both.
    seed, p = micro_params(micro_workspace, peak_flops=None, optimizer=optimizer)
    p = dataclasses.replace(p, model=dataclasses.replace(p.model, dropout=0.1))
    reference = pretrain(p, seed, paths_in(micro_workspace, tmp_path / "ref"))

    import llmpipe.train.pretrain as module

    real_lr_at = module.lr_at

    def killed_at_step_9(step, params):
        if step == 9:
            raise KeyboardInterrupt  # as if the stage were killed after the step-6 checkpoint
        return real_lr_at(step, params)

    monkeypatch.setattr(module, "lr_at", killed_at_step_9)
    paths = paths_in(micro_workspace, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        pretrain(p, seed, paths)
    assert (paths.checkpoint_dir / CHECKPOINT_FILE).exists()
    monkeypatch.setattr(module, "lr_at", real_lr_at)
    resumed = pretrain(p, seed, paths)
    assert without_perf(resumed) == without_perf(reference)
    assert reference["perf"]["mfu"] is None and reference["perf"]["peak_flops"] is None
    wa = load_file(tmp_path / "ref/model/model.safetensors")
    wb = load_file(paths.model_dir / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (tmp_path / "ref/live/plots/metrics/train/loss.tsv").read_text() == (
        paths.live_dir / "plots/metrics/train/loss.tsv"
    ).read_text()
    assert not (paths.checkpoint_dir / CHECKPOINT_FILE).exists()


def test_checkpoint_of_other_params_is_not_resumed(micro_workspace, tmp_path, monkeypatch, capsys):
    seed, p = micro_params(micro_workspace)
    paths = paths_in(micro_workspace, tmp_path)
    import llmpipe.train.pretrain as module

    real_lr_at = module.lr_at
    monkeypatch.setattr(
        module,
        "lr_at",
        lambda s, q: (_ for _ in ()).throw(KeyboardInterrupt) if s == 9 else real_lr_at(s, q),
    )
    with pytest.raises(KeyboardInterrupt):
        pretrain(p, seed, paths)
    monkeypatch.setattr(module, "lr_at", real_lr_at)
    changed = dataclasses.replace(p, learning_rate=p.learning_rate / 2)
    fresh = pretrain(changed, seed, paths_in(micro_workspace, tmp_path / "fresh"))
    rerun = pretrain(changed, seed, paths)
    assert "ignoring" in capsys.readouterr().out
    assert without_perf(rerun) == without_perf(fresh)


def test_the_parts_of_the_loop_one_by_one(micro_workspace, tmp_path):
    seed, p = micro_params(micro_workspace)
    paths, rt = paths_in(micro_workspace, tmp_path), setup_runtime("cpu")
    run = prepare(p, seed, paths, rt)
    assert run.start_step == 0 and run.model is run.raw_model  # one process, no compile
    loss = optimizer_step(run, 0)
    assert math.isfinite(loss) and run.tokens_seen == p.batch_size * p.model.block_size
    assert evaluate(run, 0) == run.val_loss > 0
    checkpoint(run, 1)
    # written in the background; a resume is a later process, after the write has finished
    run.checkpoints.wait()
    resumed = prepare(p, seed, paths, rt)  # finds the checkpoint of the same run
    assert resumed.start_step == 1 and resumed.tokens_seen == run.tokens_seen
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            run.raw_model.state_dict().values(),
            resumed.raw_model.state_dict().values(),
            strict=True,
        )
    )
    assert optimizer_step(resumed, 1) == optimizer_step(run, 1)  # same data, same weights


def test_a_non_finite_loss_never_reaches_the_weights(micro_workspace, tmp_path, monkeypatch):
    seed, p = micro_params(micro_workspace)
    run = prepare(p, seed, paths_in(micro_workspace, tmp_path), setup_runtime("cpu"))
    optimizer_step(run, 0)
    before = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    real_forward = GPT.forward
    monkeypatch.setattr(
        GPT,
        "forward",
        lambda self, idx, targets=None: (lambda out: (out[0], out[1] * float("inf")))(
            real_forward(self, idx, targets)
        ),
    )
    with pytest.raises(TrainingError, match=r"^pretrain: loss became inf at step 1$"):
        optimizer_step(run, 1)
    assert all(torch.equal(before[k], v) for k, v in run.raw_model.state_dict().items())


def test_one_host_device_synchronisation_per_optimizer_step(micro_workspace, tmp_path, monkeypatch):
    """On a GPU every read of a device tensor on the host (.item(), .tolist(), `if tensor`)
    waits for the device: an optimizer step reads the loss and gradient norm once, together."""
    seed, p = micro_params(micro_workspace, grad_accum_steps=2)
    run = prepare(p, seed, paths_in(micro_workspace, tmp_path), setup_runtime("cpu"))
    reads, counting = [], [True]

    def counting_reads(name):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, **kwargs):
            if counting[0]:
                reads.append(name)
            return real(self, *args, **kwargs)

        return counted

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, counting_reads(name))
    real_starts = EpochSampler.starts

    def starts_on_the_host(self, *args, **kwargs):  # the data position lives on the host
        counting[0] = False
        try:
            return real_starts(self, *args, **kwargs)
        finally:
            counting[0] = True

    monkeypatch.setattr(EpochSampler, "starts", starts_on_the_host)
    for step in range(3):
        optimizer_step(run, step)
    assert reads == ["tolist"] * 3


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(
    micro_workspace, tmp_path, monkeypatch
):
    seed, p = micro_params(micro_workspace)
    paths = paths_in(micro_workspace, tmp_path)
    real_forward = GPT.forward
    calls = {"n": 0}

    def forward_with_nan_at_step_8(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] == 9:  # one micro-step per step: step 8 (0-based)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward_with_nan_at_step_8)
    with pytest.raises(
        TrainingError,
        match=r"loss became nan at step 8; the last good "
        r"checkpoint is kept in .*checkpoint\.pt",
    ):
        pretrain(p, seed, paths)
    state = torch.load(paths.checkpoint_dir / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 6
    assert not paths.model_dir.exists()


def test_hf_init_checks_the_architecture(micro_workspace, tmp_path):
    from llmpipe.model.gpt import GPTConfig
    from llmpipe.model.hf import export_hf_gpt2

    export_hf_gpt2(
        GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=32)),
        tmp_path / "base",
    )
    seed, p = micro_params(micro_workspace, init=str(tmp_path / "base"), max_steps=2)
    model = build_model(p, 512)
    base = load_file(tmp_path / "base/model.safetensors")
    assert torch.equal(
        model.transformer.h[1].mlp.c_fc.weight, base["transformer.h.1.mlp.c_fc.weight"].t()
    )  # Conv1D (in, out)
    assert model.transformer.wpe.weight.shape == (32, 32)  # 64 positions cropped to block_size
    assert torch.equal(model.transformer.wpe.weight, base["transformer.wpe.weight"][:32])
    metrics = pretrain(p, seed, paths_in(micro_workspace, tmp_path / "out"))
    assert metrics["steps"] == 2
    wrong = dataclasses.replace(p, model=dataclasses.replace(p.model, n_layer=3))
    with pytest.raises(ParamsError, match=r"pretrain\.model\.n_layer: 3 differs from .*'s 2"):
        pretrain(wrong, seed, paths_in(micro_workspace, tmp_path / "out2"))


@pytest.mark.parametrize(
    ("name", "flops"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA GeForce RTX 3090", None),
        ("NVIDIA L40", None),
        ("NVIDIA RTX A1000", None),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),
    ],
)
def test_the_peak_flops_of_a_gpu_come_from_its_name(name, flops):
    from llmpipe.train.pretrain import peak_flops_of_gpu

    assert peak_flops_of_gpu(name) == flops


@pytest.fixture
def unusable_gpu(monkeypatch):
    """A machine with an NVIDIA GPU on driver 550 and torch built for CUDA 13 (needs >= 580):
    torch.cuda.is_available() is then False, without an error."""
    from llmpipe import runtime

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(runtime, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(runtime, "nvidia_gpu_present", lambda: True)


def test_cuda_asked_for_but_unusable_is_an_error_naming_the_driver_and_the_fix(unusable_gpu):
    from llmpipe.errors import DeviceError
    from llmpipe.train.pretrain import setup_runtime

    for device in ("cuda", "auto"):  # auto with a GPU present: no quiet run on the CPU either
        with pytest.raises(DeviceError) as error:
            setup_runtime(device)
        message = str(error.value)
        assert message.startswith("pretrain.device: ")
        assert "CUDA 13.0" in message and "driver >= 580.65" in message and "550.54.15" in message
        assert "--index-url https://download.pytorch.org/whl/cu126" in message
    assert setup_runtime("cpu").device == torch.device("cpu")  # asked for: fine


def test_the_trainer_stages_do_not_fall_back_to_the_cpu_either(unusable_gpu, monkeypatch):
    from llmpipe import runtime
    from llmpipe.errors import DeviceError

    with pytest.raises(DeviceError, match=r"CUDA_VISIBLE_DEVICES= \(empty\)"):
        runtime.runtime_args(seed=0)
    monkeypatch.setattr(runtime, "nvidia_gpu_present", lambda: False)  # e.g. GPUs hidden
    assert runtime.runtime_args(seed=0)["use_cpu"] is True


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("flags\t\t: fpu sse avx512f avx512_bf16\n", True),  # x86 with AVX512-BF16
        ("flags\t\t: fpu sse amx_bf16 amx_tile\n", True),  # x86 with AMX
        ("Features\t: fp asimd bf16 i8mm\n", True),  # Arm with BF16
        ("flags\t\t: fpu sse avx2 avx512f\n", False),
        (None, None),  # no /proc/cpuinfo: cannot tell, so no warning
    ],
)
def test_bf16_on_a_cpu_that_emulates_it_warns_naming_the_param(
    tmp_path, monkeypatch, capsys, cpuinfo, native
):
    from llmpipe import runtime

    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert runtime.cpu_has_native_bf16(path) is native
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    warning = runtime.warn_if_slow_bf16("bfloat16", "cpu", "pretrain.dtype")
    if native is False:
        assert "pretrain.dtype: bfloat16" in warning and "set pretrain.dtype: float32" in warning
        assert warning in capsys.readouterr().out
    else:
        assert warning is None
    # float32, or a GPU, never warns
    assert runtime.warn_if_slow_bf16("float32", "cpu", "pretrain.dtype") is None
    assert runtime.warn_if_slow_bf16("bfloat16", "cuda", "pretrain.dtype") is None

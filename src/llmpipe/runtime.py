"""How a stage's process sees its run: one process, or one of N started by torchrun or
accelerate (the executor decides: llmpipe.launch); the device of this process; and the
TrainingArguments that every trainer here (transformers' Trainer, TRL's RewardConfig and
GRPOConfig) shares.

On N processes every process trains, and the main one alone measures, writes outputs,
metrics and curves. The global batch (batch_size x grad_accum_steps, with grad_accum_steps
counted over all processes; or a whole step's pairs or prompts) is what params set, so a run on
N processes takes the same optimizer steps on the same data as a run on one.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

import torch

from llmpipe.errors import DeviceError, ParamsError
from llmpipe.stage import OUTPUTS_ON_EACH_NODE


def world_size() -> int:
    """Processes the run has (1 for a plain `python -m stages.<name>`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def outputs_on_each_node() -> bool:
    return os.environ.get(OUTPUTS_ON_EACH_NODE) == "1"


def writes_outputs() -> bool:
    """Whether this process measures and writes the stage's outputs: the main process; with
    each box its own copy of the repository, the first process of every box (the weights are
    the same on every process, so every box writes the same files). While a process group
    exists, transformers' save_pretrained writes on its rank 0 alone (should_save_on_this_rank),
    so the training stages end the group (stage.end_distributed) after their last collective,
    before they write, having dropped their trainer or DDP wrapper first (it holds the group)."""
    rank = "LOCAL_RANK" if outputs_on_each_node() else "RANK"
    return int(os.environ.get(rank, "0")) == 0


def visible_devices() -> str:
    """The GPUs this process was given (CUDA_VISIBLE_DEVICES, '' when unset): beside the device,
    it says where a figure comes from, e.g. which GPUs of a box a queued experiment had
    (llmpipe.launch.queue)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "")


def default_device() -> str:
    """This process's GPU when there is one: a launcher gives each process its own
    (LOCAL_RANK); without one, the stage sees only the first (stage.one_gpu_unless_launched).
    A GPU that torch cannot use is an error (use_cuda), not a quiet run on the CPU."""
    if not use_cuda("auto"):
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


# The oldest NVIDIA Linux driver each CUDA major version runs on (NVIDIA's CUDA toolkit release
# notes, minor-version compatibility): torch built for CUDA 13 needs a driver >= 580.
MIN_DRIVER = {11: (450, 80), 12: (525, 60), 13: (580, 65)}
# A torch for older drivers: its wheels for CUDA 12.6 run on drivers >= 525.
OLDER_DRIVER_FIX = "pip install torch=={version} --index-url https://download.pytorch.org/whl/cu126"


def nvidia_driver_version() -> str | None:
    """The loaded NVIDIA kernel driver's version, or None when there is none."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        text = ""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    if found:
        return found.group(1)
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def nvidia_gpu_present() -> bool:
    """An NVIDIA GPU on this machine, visible to this process (CUDA_VISIBLE_DEVICES set to
    nothing, or to -1, hides them all on purpose)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return (
        Path("/dev/nvidia0").exists()
        or Path("/proc/driver/nvidia/version").exists()
        or nvidia_driver_version() is not None
    )


def cuda_unusable_reason(driver: str | None = None) -> str:
    """Why torch cannot use CUDA here, and what to install: for the error of use_cuda."""
    driver = driver or nvidia_driver_version()
    have = f"NVIDIA driver {driver}" if driver else "no NVIDIA driver found"
    build = torch.version.cuda
    if build is None:
        version = torch.__version__.split("+")[0]
        return (
            f"torch {torch.__version__} is a CPU-only build ({have}); install a CUDA build "
            f"of torch (e.g. {OLDER_DRIVER_FIX.format(version=version)})"
        )
    need = MIN_DRIVER.get(int(build.split(".")[0]))
    if driver and need and tuple(int(x) for x in driver.split(".")[:2]) < need:
        return (
            f"torch {torch.__version__} is built for CUDA {build}, which needs an NVIDIA "
            f"driver >= {need[0]}.{need[1]}, and this machine has {driver}; update the "
            f"driver, or install a torch built for an older CUDA (e.g. "
            f"{OLDER_DRIVER_FIX.format(version=torch.__version__.split('+')[0])})"
        )
    return (
        f"torch {torch.__version__} (CUDA {build}) cannot initialise CUDA with {have} "
        "(see nvidia-smi; a driver and a torch whose CUDA it supports are needed)"
    )


def use_cuda(device_param: str, key: str | None = None) -> bool:
    """Whether to run on CUDA for a device param ("auto", "cuda" or "cpu"). Asked for, or with
    a GPU present under "auto", CUDA that torch cannot use stops the stage, naming the driver,
    torch's CUDA build and what to install: never a quiet run on the CPU. `key` names the param
    (None: the stage has no device param, and follows the GPUs it sees)."""
    if device_param == "cpu" or torch.cuda.is_available():
        return device_param != "cpu"
    if device_param == "cuda":
        raise DeviceError(f"{key}: 'cuda', but CUDA is unusable: {cuda_unusable_reason()}")
    if nvidia_gpu_present():
        escape = f"set {key}: cpu" if key else "set CUDA_VISIBLE_DEVICES= (empty)"
        raise DeviceError(
            f"{key or 'device'}: an NVIDIA GPU is here but CUDA is unusable: "
            f"{cuda_unusable_reason()} (to run on the CPU on purpose, {escape})"
        )
    return False


# CPU flags (/proc/cpuinfo) of instructions that compute in bf16 natively: x86's AVX512-BF16
# and AMX, Arm's BF16 extension. Without them oneDNN emulates bf16 in float32, slower than
# float32 itself.
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether this CPU computes in bf16 natively; None where it cannot be told (no
    /proc/cpuinfo: macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):  # x86, Arm
            flags.update(value.split())
    return bool(flags & NATIVE_BF16_FLAGS)


def warn_if_slow_bf16(dtype: str, device: torch.device | str, key: str) -> str | None:
    """A bf16 run on a CPU that emulates bf16 is slower than float32: say so, naming the param
    that changes it (the dtype stays the param's: the stage hash says what ran). Returns the
    warning printed, or None."""
    if (
        dtype != "bfloat16"
        or torch.device(device).type != "cpu"
        or cpu_has_native_bf16() is not False
    ):
        return None
    message = (
        f"warning: {key}: bfloat16 on a CPU without native bf16 instructions (AVX512-BF16, AMX, "
        f"Arm BF16) is emulated and slower than float32; set {key}: float32 on this machine"
    )
    print(message, flush=True)
    return message


def sharded_launch() -> bool:
    """Launched by accelerate with an FSDP or DeepSpeed config: the model is sharded."""
    return any(
        os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true"
        for engine in ("FSDP", "DEEPSPEED")
    )


def trained_model(trainer, rebuild):
    """The trained model, whole, in the main process (None in the others). Under FSDP or
    DeepSpeed (an accelerate config) each process holds a shard: every process joins the
    gather of the full weights, and the main one loads them into `rebuild()`, the model as it
    was before training. Otherwise the trainer's model is already whole; under bf16 accelerate
    wrapped its forward in autocast, which is taken off (in place), so that the model scores and
    generates afterwards as it did before training: in its weights' precision."""
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        if not writes_outputs():
            return None
        return trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    # A collective, every process; on the wrapped model (DeepSpeed's engine gathers ZeRO-3).
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if not is_main_process():
        return None
    engine = "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed"
    print(f"gathered the {engine}-sharded weights of {world_size()} processes", flush=True)
    model = rebuild()
    model.load_state_dict(state)
    return model


def per_process(total: int, key: str, what: str | None = None) -> int:
    """A global batch quantity split over the processes; it must divide evenly, so that the
    global batch, and the run, do not depend on how many processes share it. `what` says what
    `total` counts, where it is not the value of `key` itself."""
    n = world_size()
    if total % n:
        raise ParamsError(
            f"{key}: {what or total} is not divisible by the {n} processes of the "
            "launcher (the global batch must not depend on the process count)"
        )
    return total // n


def runtime_args(seed: int, bf16: bool | None = None) -> dict:
    """Device, precision and seeding arguments. TRL's configs default bf16 on even on CPU, so it
    is always given: by default, on CUDA only. Several CPU processes talk over gloo."""
    cuda = use_cuda("auto")
    return {
        "bf16": cuda if bf16 is None else bf16,
        "use_cpu": not cuda,
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        **({"ddp_backend": "gloo"} if world_size() > 1 and not cuda else {}),
        # Each box its own repository: the best checkpoint must be on every box to load it.
        "save_on_each_node": outputs_on_each_node(),
        "report_to": "none",
    }  # curves go through TrainerCurves, which leaves dvc.yaml alone


def wait_for_everyone() -> None:
    """A barrier between the launcher's processes (nothing without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def fp32_master_weights(model):
    """Keep the weights an optimizer updates in float32: every trainable floating parameter
    held in bfloat16 or float16 (a checkpoint saved in bf16 loads in bf16: transformers 5
    loads a model in its config's dtype) is cast to float32, in place; frozen ones keep their
    dtype. Lower precision belongs to the computation (bf16 autocast over these weights):
    an update far smaller than a weight (lr 1e-5 on a weight near 1) rounds to no change in
    bf16, whose 8-bit mantissa spaces the numbers near 1 by 2^-8 to 2^-7. Tied weights stay
    tied (the one Parameter is cast). Returns `model`."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype in (torch.bfloat16, torch.float16):
            parameter.data = parameter.data.float()
    return model


def checkpointing_args(enabled: bool) -> dict:
    """TrainingArguments (and TRL configs) for activation checkpointing, the non-reentrant kind
    (no input needs to require grad, as a LoRA's frozen embeddings would have to; dropout draws
    the same masks), under the name this transformers takes: `activation_checkpointing` where
    it exists (transformers 5.25; `gradient_checkpointing` is its deprecated alias there),
    else `gradient_checkpointing`."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing"
    )
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_autocast(device: torch.device | str, dtype: str):
    """The context a forward pass runs in: bf16 autocast on `device`'s type for bfloat16
    (float32 weights, bf16 matmuls), nothing for float32."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=DTYPES[dtype])


def frozen_reference(reference, dtype: str):
    """The reference frozen (eval mode, no gradients), its parameters in the compute dtype
    (bf16 halves its memory; it is never updated, so it needs no float32 copy). Buffers keep
    theirs (a rotary embedding's frequencies stay float32). In place; returns `reference`."""
    reference.eval().requires_grad_(False)
    for parameter in reference.parameters():
        if parameter.is_floating_point() and parameter.dtype != DTYPES[dtype]:
            parameter.data = parameter.data.to(DTYPES[dtype])
    return reference

"""Where a stage runs: one process, or one of N started by a launcher (torchrun, accelerate
launch); the device of this process; and the TrainingArguments that every trainer here
(transformers' Trainer, TRL's RewardConfig and GRPOConfig) shares.

Under a launcher every process trains, and the main one alone measures, writes outputs,
metrics and curves. The global batch (batch_size x grad_accum_steps, with grad_accum_steps
counted over all processes; or a whole step's pairs or prompts) is what params set, so a run on
N processes takes the same optimizer steps on the same data as a run on one.
"""

from __future__ import annotations

import os

import torch

from llmpipe.errors import ParamsError


def world_size() -> int:
    """Processes the launcher started (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def default_device() -> str:
    """This process's GPU when there is one: a launcher gives each process its own
    (LOCAL_RANK); without one, the stage sees only the first (stage.one_gpu_unless_launched)."""
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def sharded_launch() -> bool:
    """Launched by accelerate with an FSDP or DeepSpeed config: the model is sharded."""
    return any(os.environ.get(f"ACCELERATE_USE_{engine}", "").lower() == "true"
               for engine in ("FSDP", "DEEPSPEED"))


def trained_model(trainer, rebuild):
    """The trained model, whole, in the main process (None in the others). Under FSDP or
    DeepSpeed (an accelerate config) each process holds a shard: every process joins the
    gather of the full weights, and the main one loads them into `rebuild()`, the model as it
    was before training. Otherwise the trainer's model is already whole."""
    if not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return trainer.model if is_main_process() else None
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
        raise ParamsError(f"{key}: {what or total} is not divisible by the {n} processes of the "
                          "launcher (the global batch must not depend on the process count)")
    return total // n


def runtime_args(seed: int, bf16: bool | None = None) -> dict:
    """Device, precision and seeding arguments. TRL's configs default bf16 on even on CPU, so it
    is always given: by default, on CUDA only. Several CPU processes talk over gloo."""
    cuda = torch.cuda.is_available()
    return {"bf16": cuda if bf16 is None else bf16, "use_cpu": not cuda, "seed": seed,
            "data_seed": seed, "dataloader_num_workers": 0,
            **({"ddp_backend": "gloo"} if world_size() > 1 and not cuda else {}),
            "report_to": "none"}  # curves go through TrainerCurves, which leaves dvc.yaml alone


def wait_for_everyone() -> None:
    """A barrier between the launcher's processes (nothing without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()

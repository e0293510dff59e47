"""TRL's GRPOTrainer as the RL stages run it (grpo, task_grpo), and what it needs of the machine
and the launcher. Its defaults that changed across TRL versions are set here or from params."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmpipe.data.chat import TEMPLATE_KWARGS, PromptFormat
from llmpipe.errors import ParamsError
from llmpipe.model.loading import load_tokenizer
from llmpipe.rl.params import GrpoParams, GrpoTrainingParams
from llmpipe.runtime import per_process, runtime_args, trained_model, world_size
from llmpipe.train.lora import adapter_config


def run_grpo(
    policy_dir: Path,
    rewards: Sequence[tuple[Callable[..., list[float]], float]],
    prompts: Sequence[str | dict],
    prompt_format: PromptFormat,
    p: GrpoTrainingParams,
    seed: int,
    live_dir: Path,
    curve=None,
):
    """GRPO on the policy against weighted rewards (TRL reward functions: prompts and
    completions are text, or messages under a chat format); returns (policy (merged if LoRA;
    None outside the main process), steps done). `curve`: the over-optimisation curve
    (llmpipe.rl.harness.HeldoutCurve), measured by the main process inside the Trainer."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, set_seed
    from trl import GRPOConfig, GRPOTrainer

    from llmpipe.train.callbacks import OveroptimisationCurve, TrainerCurves

    completions_per_process = check_grpo_launch(p)
    set_seed(seed)  # LoRA's initial weights come before the Trainer seeds anything
    tokenizer = load_tokenizer(policy_dir)
    tokenizer.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
    reward_funcs, weights = (list(x) for x in zip(*rewards, strict=True))
    work_dir = tempfile.mkdtemp(prefix="llmpipe-grpo-")
    args = GRPOConfig(
        output_dir=work_dir,
        max_steps=p.max_steps,
        per_device_train_batch_size=completions_per_process,
        num_generations=p.num_generations,
        use_vllm=p.use_vllm,
        vllm_mode="colocate",  # generation inside the training processes: no server to start
        beta=p.beta,
        loss_type=p.loss_type,
        scale_rewards=p.scale_rewards,
        learning_rate=p.learning_rate,
        # a param, as the from-scratch REINFORCE's: the two are compared on the same schedule
        lr_scheduler_type=p.lr_schedule,
        max_completion_length=p.max_completion_length,
        temperature=p.temperature,
        top_k=0,  # plain temperature sampling, as the preference pairs were sampled
        disable_dropout=True,  # defaults off: dropout would make the log-ratios noise
        reward_weights=weights,
        chat_template_kwargs=TEMPLATE_KWARGS,  # conversational prompts render as ours do
        gradient_checkpointing=False,  # defaults on
        logging_steps=1,
        save_strategy="no",
        **runtime_args(seed),
    )
    peft_config = (
        adapter_config(
            policy,
            p.lora_r,
            p.lora_alpha,
            0.0,
            p.lora_target_modules,
            f"{_section(p)}.lora_target_modules",
        )
        if p.use_lora
        else None
    )
    callbacks = [curves := TrainerCurves(live_dir)]
    if curve is not None:
        callbacks.append(OveroptimisationCurve(curves, curve))
    try:
        rows = [q if isinstance(q, dict) else {"prompt": q} for q in prompts]
        rows = [{**q, "prompt": prompt_format.trl_prompt(q["prompt"])} for q in rows]
        trainer = GRPOTrainer(
            model=policy,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    def rebuild():
        from peft import get_peft_model

        fresh = AutoModelForCausalLM.from_pretrained(policy_dir, use_safetensors=True)
        return get_peft_model(fresh, peft_config) if p.use_lora else fresh

    model = trained_model(trainer, rebuild)
    if model is None:  # not the main process
        return None, trainer.state.global_step
    if p.use_lora:
        model = model.merge_and_unload()
    model.config.use_cache = True
    return model, trainer.state.global_step


def check_curve(p: GrpoParams) -> None:
    """The curve generates in the main process alone: a sharded model (FSDP, ZeRO-3) needs every
    process for that, and would wait until the Trainer's ddp_timeout."""
    from llmpipe.runtime import sharded_launch

    if p.curve_interval and sharded_launch():
        raise ParamsError(
            f"{_section(p)}.curve_interval: {p.curve_interval} needs the whole "
            "model in the main process; under an FSDP/DeepSpeed launch set it to 0"
        )


def _section(p) -> str:
    """The params section a GRPO run's settings come from (grpo, task_grpo), for messages."""
    return p.SECTION


def check_grpo_launch(p: GrpoTrainingParams) -> int:
    """What GRPO needs of the machine and its processes; returns the completions per process.
    Cheap: the stage calls it before its first measurement."""
    check_vllm(p)
    if world_size() != p.processes:
        raise ParamsError(
            f"{_section(p)}.processes: {p.processes}, but {world_size()} processes run it (its "
            f"completions depend on the count, so the count is a param: set "
            f"{_section(p)}.processes: {world_size()}, or run it through python -m "
            "llmpipe.launch, which starts that many)"
        )
    completions = p.prompts_per_step * p.num_generations
    return per_process(
        completions,
        f"{_section(p)}.prompts_per_step",
        f"{p.prompts_per_step} prompts x {p.num_generations} generations = "
        f"{completions} completions",
    )


def check_vllm(p: GrpoTrainingParams) -> None:
    """vLLM generates on CUDA only, and is an optional install."""
    import importlib.util

    if not p.use_vllm:
        return
    if not torch.cuda.is_available():
        raise ParamsError(
            f"{_section(p)}.use_vllm: true needs a CUDA GPU (vLLM generates on "
            "CUDA only; "
            "set it to false to generate with transformers)"
        )
    if importlib.util.find_spec("vllm") is None:
        raise ParamsError(
            f"{_section(p)}.use_vllm: true needs vLLM, which is not installed "
            "(pip install -e '.[gpu]')"
        )

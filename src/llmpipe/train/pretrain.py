"""The pretraining loop for llmpipe's own GPT: nanoGPT's loop, resumable and distributed.

- AdamW (or Muon for the hidden matrices), linear warmup then a cosine or warmup-stable-decay
  schedule to min_lr, gradient clipping, gradient accumulation;
- autocast in the dtype from params, optional torch.compile;
- several processes under torchrun with DistributedDataParallel: every process draws the same
  window starts for a step and takes its share, so the global batch (and the loss curve) equals
  the single-process run's;
- a checkpoint every N steps (model, optimizer, step, RNG states, data position, curve
  history), written atomically; a rerun with the same params resumes from it and ends with the
  same weights as an uninterrupted run; a finished run deletes it;
- a loss that becomes NaN or inf stops the run, naming the step, before the optimizer can touch
  the weights; the last good checkpoint stays.

`pretrain()` reads top to bottom: `prepare` (set-up and resume), then per step
`optimizer_step` (one host-device synchronisation: the loss and gradient norm read together),
`evaluate` every eval_interval steps and `checkpoint` every checkpoint_interval, then `finish`
(export and metrics). Each part takes the `PretrainRun` that holds the state, and tests call
them one by one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.distributed as dist

from llmpipe import runtime
from llmpipe.data.tokens import EpochSampler, TokenBin, read_meta, unigram_perplexity
from llmpipe.errors import DataError, LlmpipeError, ParamsError
from llmpipe.evaluation.intervals import write_items
from llmpipe.evaluation.scores import WindowScore, token_byte_lengths, window_scores
from llmpipe.io import atomic_dir, atomic_path, remove_stale_temporaries, write_json
from llmpipe.model.gpt import GPT, GPTConfig, Optimizers
from llmpipe.model.hf import export_hf_gpt2, load_hf_gpt2
from llmpipe.stage import end_distributed
from llmpipe.train.params import PretrainParams, SampleParams
from llmpipe.train.tracking import curves_live

CHECKPOINT_FILE = "checkpoint.pt"


class TrainingError(LlmpipeError):
    """Training diverged (NaN/inf loss)."""


@dataclass(frozen=True)
class PretrainPaths:
    tokens_dir: Path  # data/tokens/pretrain: train.bin, val.bin, meta.json
    tokenizer_dir: Path
    model_dir: Path  # the Hugging Face export of the final model
    checkpoint_dir: Path  # no DVC output: left alone between runs, so a killed run can resume
    live_dir: Path  # dvclive curves
    items_file: Path | None = None  # the final validation loss per window (layout.items_file)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its rank among torchrun's processes and its device."""

    rank: int
    world_size: int
    device: torch.device
    # Measures and writes: rank 0; with each box its own copy of the repository, the first
    # process of every box (runtime.writes_outputs).
    writes: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device_param: str) -> Runtime:
    # A GPU that torch cannot use stops the run, naming the cause: never a silent CPU run.
    want_cuda = runtime.use_cuda(device_param, "pretrain.device")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(0, 1, torch.device("cuda" if want_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if want_cuda else "cpu")
    return Runtime(dist.get_rank(), world_size, device, runtime.writes_outputs())


# Dense bf16/fp16 tensor-core peaks from NVIDIA's data sheets (FLOP/s per GPU), matched in
# order against torch.cuda.get_device_name(): the MFU denominator nanoGPT and nanochat use.
PEAK_BF16_FLOPS = (
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H100",), 989e12),  # SXM
    (("H200", "NVL"), 835e12),
    (("H200",), 989e12),  # SXM
    (("A100",), 312e12),
    (("L40S",), 362e12),
    (("L4",), 121e12),
)


def known_peak_flops(device: torch.device, dtype: str) -> float | None:
    """The data-sheet peak of this GPU in bf16/fp16, or None (then MFU is not given)."""
    if device.type != "cuda" or dtype == "float32":
        return None
    return peak_flops_of_gpu(torch.cuda.get_device_name(device))


def peak_flops_of_gpu(name: str) -> float | None:
    """By whole words of the name ("L4" is not "L40S"); a MIG slice has a share of the card's
    peak that its name does not give, so it is measured."""
    words_of_name = set(re.split(r"[\s_-]+", name))
    if "MIG" in words_of_name:
        return None
    for words, flops in PEAK_BF16_FLOPS:
        if words_of_name.issuperset(words):
            return flops
    return None


def lr_at(step: int, p: PretrainParams) -> float:
    """Linear warmup to learning_rate, then to min_lr at max_steps: a cosine decay, or (wsd)
    constant until the last cooldown_fraction of the steps and a linear decay over those
    (warmup-stable-decay: Hu et al. 2024, Hägele et al. 2024)."""
    if step < p.warmup_steps:
        return p.learning_rate * (step + 1) / p.warmup_steps
    if p.schedule == "wsd":
        cooldown = max(round(p.cooldown_fraction * p.max_steps), 1)
        progress = min(max(step - (p.max_steps - cooldown) + 1, 0) / cooldown, 1.0)
        return p.learning_rate + progress * (p.min_lr - p.learning_rate)
    decay_steps = max(p.max_steps - p.warmup_steps, 1)
    progress = min((step - p.warmup_steps) / decay_steps, 1.0)
    return p.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (p.learning_rate - p.min_lr)


def build_model(p: PretrainParams, vocab_size: int) -> GPT:
    if p.init == "scratch":
        return GPT(GPTConfig(vocab_size=vocab_size, **dataclasses.asdict(p.model)))
    if p.model.vocab_multiple != 1:
        raise ParamsError(
            f"pretrain.model.vocab_multiple: {p.model.vocab_multiple} pads a model "
            "trained from scratch; a loaded checkpoint keeps its vocabulary (set 1)"
        )
    name = p.init.removeprefix("hf:")
    if not p.init.startswith("hf:") and not Path(name).is_dir():
        raise DataError(f"pretrain.init: {p.init!r} is no directory (nor scratch or hf:<name>)")
    try:
        model = load_hf_gpt2(name, trust_remote_code=p.trust_remote_code, dropout=p.model.dropout)
    except (OSError, ValueError) as e:
        raise DataError(f"pretrain.init: cannot load {p.init!r} ({e})") from e
    cfg = model.config
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(p.model, key) != getattr(cfg, key):
            raise ParamsError(
                f"pretrain.model.{key}: {getattr(p.model, key)} differs from "
                f"{p.init}'s {getattr(cfg, key)}"
            )
    if cfg.vocab_size != vocab_size:
        raise ParamsError(
            f"pretrain.init: {p.init} has a vocabulary of {cfg.vocab_size}, the "
            f"token data {vocab_size} (tokenize with the same tokenizer)"
        )
    if p.model.block_size > cfg.block_size:
        raise ParamsError(
            f"pretrain.model.block_size: {p.model.block_size} is more than "
            f"{p.init}'s {cfg.block_size} positions"
        )
    if p.model.block_size < cfg.block_size:  # crop the learned positions (nanoGPT does too)
        wpe = model.transformer.wpe
        wpe.weight = torch.nn.Parameter(wpe.weight[: p.model.block_size].detach().clone())
        cfg.block_size = p.model.block_size
    return model


def run_digest(p: PretrainParams, seed: int, meta: dict) -> str:
    """Identifies a run: a checkpoint from any other run must never be resumed. The process
    count is not part of it: the global batch, the data order and so the run are the same on
    any number of processes, and a run may resume on another."""
    payload = {
        "params": dataclasses.asdict(p),
        "seed": seed,
        "data": {s: i["sha256"] for s, i in meta["splits"].items()},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def load_checkpoint(checkpoint_dir: Path, digest: str) -> dict | None:
    path = checkpoint_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("digest") != digest:
        print(f"ignoring {path}: it belongs to a run with other params or data")
        return None
    return state


class CurveLog:
    """Training curves through dvclive (rank 0 only), replayable after a resume so the curve
    files of a resumed run equal those of an uninterrupted one."""

    def __init__(self, live_dir: Path, history: list[dict]):
        self.live = curves_live(live_dir)
        self.history = history
        for record in history:
            self._write(record)

    def _write(self, record: dict) -> None:
        self.live.step = record["step"]
        for name, value in record.items():
            if name != "step":
                self.live.log_metric(name, value)
        self.live.next_step()

    def log(self, record: dict) -> None:
        self.history.append(record)
        self._write(record)

    def close(self) -> None:
        self.live.end()


@torch.no_grad()
def sample(model: GPT, tokenizer, p: SampleParams, seed: int, device: torch.device) -> list[dict]:
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = []
    for prompt in p.prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        out = model.generate(
            ids,
            p.max_new_tokens,
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            eos_token_id=tokenizer.eos_token_id,
            generator=generator,
        )
        samples.append(
            {
                "prompt": prompt,
                "completion": tokenizer.decode(
                    out[0, ids.size(1) :].tolist(), skip_special_tokens=True
                ),
            }
        )
    model.train()
    return samples


def autocast_for(p: PretrainParams, device: torch.device):
    if p.dtype == "float32":
        return contextlib.nullcontext
    if p.dtype == "float16" and device.type != "cuda":
        raise ParamsError("pretrain.dtype: 'float16' needs a CUDA device (use bfloat16 on CPU)")
    dtype = getattr(torch, p.dtype)
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class PretrainRun:
    """Everything one training run holds, from set-up to export."""

    p: PretrainParams
    seed: int
    paths: PretrainPaths
    rt: Runtime
    train_bin: TokenBin
    val_bin: TokenBin
    tokenizer: object
    raw_model: GPT  # the module whose weights are saved
    model: torch.nn.Module | None  # what is called: raw_model, compiled and/or DDP-wrapped
    optimizer: torch.optim.Optimizer | Optimizers
    scaler: torch.amp.GradScaler
    sampler: EpochSampler
    autocast: Callable
    digest: str
    peak_flops: float | None
    curves: CurveLog | None  # rank 0 only
    checkpoints: CheckpointWriter | None = None  # rank 0 only
    start_step: int = 0
    history: list[dict] = field(default_factory=list)
    tokens_seen: int = 0
    data_position: int = 0  # training windows drawn so far, over all processes
    val_loss: float | None = None
    val_bits_per_byte: float | None = None
    val_score: WindowScore | None = None

    @cached_property
    def token_bytes(self) -> torch.Tensor:
        """Each token's UTF-8 bytes, for bits per byte (evaluation.token_byte_lengths)."""
        return token_byte_lengths(self.tokenizer)

    @property
    def micro_steps(self) -> int:
        """Micro-batches of this process per optimizer step."""
        return self.p.grad_accum_steps // self.rt.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.p.grad_accum_steps * self.p.batch_size * self.p.model.block_size


def prepare(p: PretrainParams, seed: int, paths: PretrainPaths, rt: Runtime) -> PretrainRun:
    """Set-up: data, model, optimizer, and the state of an interrupted run if one matches."""
    from transformers import AutoTokenizer

    meta = read_meta(paths.tokens_dir)
    train_bin = TokenBin.open(paths.tokens_dir, "train")
    val_bin = TokenBin.open(paths.tokens_dir, "val")
    if p.grad_accum_steps % rt.world_size:
        raise ParamsError(
            f"pretrain.grad_accum_steps: {p.grad_accum_steps} is not "
            f"divisible by the {rt.world_size} processes"
        )
    # MFU needs a peak the user declares or a data sheet gives: a peak measured by a short
    # matmul at start-up moves from run to run (a CPU measured half its usual peak once, and
    # reported an MFU above 1), so without either MFU is not given.
    peak_flops = p.peak_flops or known_peak_flops(rt.device, p.dtype)
    if rt.writes:
        runtime.warn_if_slow_bf16(p.dtype, rt.device, "pretrain.dtype")

    # Every process seeds alike and consumes random numbers alike (dropout on equal shapes;
    # sampling uses its own generator), so rank 0's RNG state is every rank's.
    torch.manual_seed(seed)  # the same initial weights in every process
    raw_model = build_model(p, meta["vocab_size"]).to(rt.device)
    raw_model.config.chunked_loss = p.chunked_loss
    raw_model.config.gradient_checkpointing = p.gradient_checkpointing
    optimizer = raw_model.configure_optimizers(
        p.weight_decay, p.learning_rate, (p.beta1, p.beta2), rt.device.type, p.optimizer
    )
    run = PretrainRun(
        p=p,
        seed=seed,
        paths=paths,
        rt=rt,
        train_bin=train_bin,
        val_bin=val_bin,
        tokenizer=AutoTokenizer.from_pretrained(paths.tokenizer_dir),
        raw_model=raw_model,
        model=None,
        optimizer=optimizer,
        scaler=torch.amp.GradScaler(enabled=p.dtype == "float16"),
        sampler=EpochSampler(train_bin, p.model.block_size, seed),
        autocast=autocast_for(p, rt.device),
        digest=run_digest(p, seed, meta),
        peak_flops=peak_flops,
        curves=None,
    )
    resume(run)
    if rt.writes:
        run.curves = CurveLog(paths.live_dir, run.history)
        run.checkpoints = CheckpointWriter(paths.checkpoint_dir / CHECKPOINT_FILE)
    run.model = wrap_model(raw_model, p, rt)
    return run


def wrap_model(raw_model: GPT, p: PretrainParams, rt: Runtime) -> torch.nn.Module:
    model: torch.nn.Module = torch.compile(raw_model) if p.compile else raw_model
    if rt.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None
        )
    return model


def resume(run: PretrainRun) -> None:
    """Load the checkpoint of an interrupted run with the same digest, if there is one."""
    paths, rt = run.paths, run.rt
    paths.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(paths.checkpoint_dir / CHECKPOINT_FILE)  # a kill while writing
    # Rank 0 decides, and every rank resumes from its copy: on several boxes the others may have
    # none (only rank 0 writes them on a shared file system) or a stale one.
    state = load_checkpoint(paths.checkpoint_dir, run.digest) if rt.is_main else None
    if rt.world_size > 1:
        shared = [state]
        dist.broadcast_object_list(shared, src=0, device=rt.device)
        state = shared[0]
    if state is None:
        return
    run.raw_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if rt.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], rt.device)
    run.data_position = state["data_position"]
    run.start_step, run.history, run.tokens_seen = state["step"], state["history"], state["tokens"]
    if rt.is_main:
        print(f"resuming from {paths.checkpoint_dir / CHECKPOINT_FILE} at step {run.start_step}")


def to_device(device: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Host batches to the device; to a GPU from pinned memory, so that the copy runs
    asynchronously beside the compute."""
    if device.type == "cuda":
        tensors = tuple(t.pin_memory() for t in tensors)
    return [t.to(device, non_blocking=True) for t in tensors]


def optimizer_step(run: PretrainRun, step: int) -> float:
    """One optimizer step over the global batch; returns its mean training loss.

    The loss and the gradient norm reach the host together, in the one host-device
    synchronisation of the step (float16 adds the GradScaler's own check for inf gradients),
    and a non-finite value stops the run before the optimizer can apply it.
    """
    p, rt = run.p, run.rt
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(step, p)
    block, micro_steps = p.model.block_size, run.micro_steps
    # Every process draws the same starts and takes its share: the global batch is the
    # single-process run's.
    starts = run.sampler.starts(run.data_position, p.grad_accum_steps * p.batch_size)
    run.data_position += len(starts)
    mine = starts[rt.rank * micro_steps * p.batch_size : (rt.rank + 1) * micro_steps * p.batch_size]
    step_loss = torch.zeros((), device=rt.device)
    for micro in range(micro_steps):
        x, y = to_device(
            rt.device,
            *run.train_bin.batch(mine[micro * p.batch_size : (micro + 1) * p.batch_size], block),
        )
        # DDP all-reduces gradients on the last micro-step only. (No local name holds the
        # DDP wrapper: see the teardown in pretrain().)
        with (
            (
                run.model.no_sync()
                if rt.world_size > 1 and micro < micro_steps - 1
                else contextlib.nullcontext()
            ),
            run.autocast(),
        ):
            loss = run.model(x, y)[1] / micro_steps
        run.scaler.scale(loss).backward()
        step_loss += loss.detach()
    if rt.world_size > 1:
        dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
    run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(
        run.raw_model.parameters(), p.grad_clip if p.grad_clip > 0 else math.inf
    )
    train_loss, norm = torch.stack([step_loss.float(), grad_norm.float()]).tolist()
    if not math.isfinite(train_loss):
        raise TrainingError(
            f"pretrain: loss became {train_loss} at step {step}{last_good_checkpoint(run)}"
        )
    if not run.scaler.is_enabled() and not math.isfinite(norm):  # fp16: the scaler skips it
        raise TrainingError(
            f"pretrain: gradient norm became {norm} at step {step}{last_good_checkpoint(run)}"
        )
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.tokens_seen += run.tokens_per_step
    return train_loss


def evaluate(run: PretrainRun, step: int) -> float:
    """Validation loss on the fixed windows, sharded over the processes (every process calls
    it); and a sample generation, printed by rank 0."""
    from tqdm import tqdm

    p = run.p
    score = window_scores(
        run.raw_model,
        run.val_bin,
        p.model.block_size,
        p.eval_windows,
        p.batch_size,
        run.token_bytes,
        run.autocast,
        sharded=True,
    )
    run.val_loss, run.val_bits_per_byte, run.val_score = score.loss, score.bits_per_byte, score
    if p.sample is not None and run.rt.writes:
        first = sample(run.raw_model, run.tokenizer, p.sample, run.seed, run.rt.device)[0]
        tqdm.write(f"step {step + 1}: {first['prompt']!r} -> {first['completion']!r}")
    return run.val_loss


def checkpoint(run: PretrainRun, next_step: int) -> None:
    """Everything an exact resume at `next_step` needs (rank 0): copied to the host now, written
    atomically in the background while training goes on (CheckpointWriter)."""
    rt = run.rt
    run.checkpoints.write(
        {
            "digest": run.digest,
            "step": next_step,
            "model": run.raw_model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "data_position": run.data_position,
            **(
                {"cuda_rng": torch.cuda.get_rng_state(rt.device)}
                if rt.device.type == "cuda"
                else {}
            ),
            "history": run.history,
            "tokens": run.tokens_seen,
        }
    )


def finish(run: PretrainRun, tokens_per_s: float, started: float) -> dict:
    """Export the model with its samples, close the curves, drop the checkpoint; the metrics."""
    p, rt = run.p, run.rt
    raw_model = run.raw_model.eval()
    samples = sample(raw_model, run.tokenizer, p.sample, run.seed, rt.device) if p.sample else []
    val_targets = [
        y for _, y in run.val_bin.eval_batches(p.model.block_size, p.eval_windows, p.batch_size)
    ]
    interval = [r["train/loss"] for r in run.history[-p.eval_interval :]]
    windows = run.sampler.windows
    metrics = {
        "parameters": raw_model.num_params(),
        "steps": p.max_steps,
        "tokens_seen": run.tokens_seen,
        # Chinchilla's measure of how fed a model is (Hoffmann et al. 2022: about 20 is
        # compute-optimal), over all parameters: the embedding is a large share of a small model.
        "tokens_per_parameter": run.tokens_seen / raw_model.num_params(),
        # Different training tokens the model saw (each window's block_size inputs): the epoch
        # sampler draws a window again only in the next epoch.
        "unique_tokens_seen": run.sampler.unique_windows(run.data_position) * p.model.block_size,
        "epochs": run.data_position / windows,
        "train_windows": windows,
        "train_loss": sum(interval) / len(interval),
        "val_loss": run.val_loss,
        **run.val_score.perplexity_metrics(),  # val_perplexity and its interval over windows
        "val_bits_per_byte": run.val_bits_per_byte,
        "unigram_val_perplexity": unigram_perplexity(run.train_bin, val_targets),
        "perf": {
            "tokens_per_s": tokens_per_s,
            # peak_flops is one device's: MFU is per device.
            "mfu": (
                raw_model.estimate_mfu(tokens_per_s / rt.world_size, run.peak_flops)
                if run.peak_flops
                else None  # "n/a": no declared or known peak (pretrain.peak_flops)
            ),
            "peak_flops": run.peak_flops,
            "wall_s": time.perf_counter() - started,
            "device": str(rt.device),
            "processes": rt.world_size,
            "dtype": p.dtype,
        },
    }
    with atomic_dir(run.paths.model_dir) as tmp:
        export_hf_gpt2(raw_model.cpu(), tmp, tokenizer=run.tokenizer)
        write_json(tmp / "samples.json", samples)
    if run.paths.items_file is not None:
        write_items(run.paths.items_file, {"items": run.val_score.items()})
    run.curves.close()
    run.checkpoints.close()  # a checkpoint still being written lands before it is removed
    # A finished run leaves no checkpoint behind: a rerun with new params starts afresh.
    (run.paths.checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    return metrics


def pretrain(p: PretrainParams, seed: int, paths: PretrainPaths) -> dict | None:
    """Train, export the model to paths.model_dir and return the metrics (None on ranks > 0)."""
    from tqdm import tqdm

    started = time.perf_counter()
    rt = setup_runtime(p.device)
    run = None
    try:
        run = prepare(p, seed, paths, rt)
        train_seconds, timed_tokens, tokens_per_s = 0.0, 0, 0.0
        bar = tqdm(
            range(run.start_step, p.max_steps),
            initial=run.start_step,
            total=p.max_steps,
            desc="pretrain",
            mininterval=1.0,
            disable=True if not rt.writes else None,
        )  # None: off when not a terminal
        for step in bar:
            step_started = time.perf_counter()
            train_loss = optimizer_step(run, step)
            if step > run.start_step:  # the first step pays for warm-up (and compilation)
                train_seconds += time.perf_counter() - step_started
                timed_tokens += run.tokens_per_step
                tokens_per_s = timed_tokens / train_seconds
            record = {
                "step": step,
                "train/loss": train_loss,
                "lr": run.optimizer.param_groups[0]["lr"],
                "perf/tokens_per_s": round(tokens_per_s, 1),
            }
            done = step + 1 == p.max_steps
            if (step + 1) % p.eval_interval == 0 or done:  # every process scores its share
                record["val/loss"] = evaluate(run, step)
            if run.curves is not None:
                run.curves.log(record)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            if rt.writes and (step + 1) % p.checkpoint_interval == 0 and not done:
                checkpoint(run, step + 1)
        bar.close()
        if rt.world_size > 1:  # the last collective is done (runtime.writes_outputs)
            run.model = None  # the DDP wrapper holds the group: it goes first
            end_distributed()  # before any writing (runtime.writes_outputs)
        if not rt.writes:
            return None
        return finish(run, tokens_per_s, started)
    finally:
        if run is not None and run.checkpoints is not None:
            # On error paths too the last good checkpoint lands; a failed write was raised by
            # finish()'s close() on the normal path, and must not hide the error in flight here.
            run.checkpoints.wait()
        if rt.world_size > 1 and dist.is_initialized():  # an error path: the group is still up
            if run is not None:
                run.model = None  # the DDP wrapper goes first, even where a traceback keeps `run`
            end_distributed()


def last_good_checkpoint(run: PretrainRun) -> str:
    if run.checkpoints is not None:
        run.checkpoints.wait()  # a checkpoint being written lands first, and is named
    last = run.paths.checkpoint_dir / CHECKPOINT_FILE
    return f"; the last good checkpoint is kept in {last}" if last.exists() else ""


class CheckpointWriter:
    """Writes checkpoints on a background thread, so that rank 0 does not hold up the other
    ranks (they would wait at the next all-reduce) while a large state goes to disk: `write`
    copies the state to the host, which is fast and must happen before training changes it, and
    returns; the file is written atomically behind it. One write at a time: the next `write`,
    and `close`, wait for the one before."""

    def __init__(self, path: Path):
        self.path = path
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, state: dict) -> None:
        self.close()
        snapshot = _host_copy(state)
        self._thread = threading.Thread(
            target=self._save, args=(snapshot,), daemon=False, name="checkpoint-writer"
        )
        self._thread.start()

    def _save(self, state: dict) -> None:
        try:
            with atomic_path(self.path) as tmp:
                torch.save(state, tmp)
        except BaseException as e:  # re-raised in the training thread by close()
            self._error = e

    def wait(self) -> None:
        """Wait for the write in flight (its error, if any, is kept for close)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Wait for the write in flight; raise its error, if it failed."""
        self.wait()
        if self._error is not None:
            error, self._error = self._error, None
            raise LlmpipeError(f"{self.path}: the checkpoint could not be written ({error})")


def _host_copy(value):
    """A copy of a state (nested dicts, lists, tensors) on the host that training cannot change:
    tensors are cloned (on a CPU the state dict holds the live parameters themselves)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_host_copy(v) for v in value)
    return value

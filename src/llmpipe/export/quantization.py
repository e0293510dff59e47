"""Post-training int8 quantization of a Hugging Face causal LM: int8 modules for the CPU, and
torchao's kernels for the weight-only method on a GPU (`on_device`).

GPT-2's projections are transformers' `Conv1D` (weight (in, out)), which quantizers skip: they
are converted to `nn.Linear` first (an exact transpose), so that every projection of every block
is quantized, not only the head. Both methods store each weight as int8 with one fp32 scale per
output channel (symmetric, zero point 0):

- `dynamic_int8`: activations are quantized too, per token at run time, and the matmul runs in
  int8 (`torch._int_mm`, int32 accumulation), then rescaled.
- `weight_only_int8`: the int8 weight is cast to the activation dtype inside the matmul.
- `static_int8`: like dynamic, but each layer's activation scale is fixed in advance from the
  largest input it saw on calibration windows (from the training split): no per-token
  max at run time, at the price of clipping inputs beyond the calibrated range.

The modules hold plain tensors (no quantized tensor types), so `torch.compile` traces them into
one graph with the rest of the model; that is the fast decoding path (`llmpipe.model.decoding`).
`torch.ao.quantization.quantize_dynamic` (deprecated) and torchao 0.18's int8 configs were
measured against these and lost: see bench/README.md.

Saved form, loadable without pickle: `quantized.safetensors` holds plain tensors (int8 weights
and their scales, everything else in fp32), `quantization.json` the recipe, and the config and
tokenizer sit beside. With tied embeddings, the token embedding is not stored twice: it is
rebuilt from the int8 head, which is what brings the file under half the fp32 size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from llmpipe import runtime
from llmpipe.errors import DataError, ParamsError
from llmpipe.evaluation.intervals import write_items
from llmpipe.evaluation.scores import (
    InferenceBench,
    inference_figures,
    loss_change_metrics,
    top1_agreement,
)

METHODS = ("dynamic_int8", "weight_only_int8", "static_int8")
WEIGHTS_FILE = "quantized.safetensors"
RECIPE_FILE = "quantization.json"
FORMAT_VERSION = 2  # 1: torch.ao quantized tensors with zero points (before plain int8 modules)


def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace every transformers Conv1D by the equivalent nn.Linear, in place."""
    from transformers.pytorch_utils import Conv1D

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                n_in, n_out = child.weight.shape
                linear = nn.Linear(n_in, n_out)
                with torch.no_grad():
                    linear.weight.copy_(child.weight.t())
                    linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
    return model


def to_int8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with a given (broadcastable) scale: values ~= result * scale."""
    return torch.round(values / scale).clamp(-127, 127).to(torch.int8)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 values, fp32 scale per row), weight ~= values * scale."""
    scale = weight.detach().float().abs().amax(dim=-1).clamp(min=1e-8) / 127
    return to_int8(weight.detach().float(), scale.unsqueeze(-1)), scale


class Int8Linear(nn.Module):
    """A Linear whose weight (out, in) is int8 with one scale per output channel."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        module = cls(linear.in_features, linear.out_features, linear.bias is not None)
        module.qweight, module.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            module.bias = linear.bias.detach().float().clone()
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.unsqueeze(1)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias

    def _int8_activation_matmul(
        self, x: torch.Tensor, input_scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """int8 x int8 matmul with int32 accumulation: the activations are quantized with
        `input_scale`, or per row at run time without one; the result has x's dtype."""
        rows = x.reshape(-1, self.in_features).float()
        if input_scale is None:
            q_rows, row_scale = quantize_rows(rows)
            input_scale = row_scale.unsqueeze(1)
        else:
            q_rows = to_int8(rows, input_scale)
        y = torch._int_mm(q_rows, self.qweight.t()).float() * input_scale * self.scale
        return self._add_bias(y).to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, int8 weight"
        )


class WeightOnlyInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype))


class DynamicInt8Linear(Int8Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._int8_activation_matmul(x)


class StaticInt8Linear(Int8Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("input_scale", torch.ones(()))  # set by calibration

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._int8_activation_matmul(x, self.input_scale)


MODULES = {
    "dynamic_int8": DynamicInt8Linear,
    "weight_only_int8": WeightOnlyInt8Linear,
    "static_int8": StaticInt8Linear,
}


@torch.no_grad()
def calibration_inputs(
    train_bins, block_size: int, windows: int, batch_size: int
) -> list[torch.Tensor]:
    """Token-id batches (B, T) of `windows` windows of the *training* split (a TokenBin): the
    activation ranges of static_int8 must never come from the windows it is evaluated on."""
    return [x for x, _ in train_bins.eval_batches(block_size, windows, batch_size)]


def calibrate_input_scales(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Per nn.Linear: the symmetric int8 scale (max |input| / 127) over `batches` of token ids."""
    absmax: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, inputs):
            seen = inputs[0].detach().abs().amax().float()
            absmax[name] = torch.maximum(absmax.get(name, seen), seen)

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        for batch in batches:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value.clamp(min=1e-8) / 127 for name, value in absmax.items()}


def _replace_linears(model: nn.Module, method: str, from_weights: bool) -> list[str]:
    """Swap every nn.Linear for the method's int8 module; returns the swapped names."""
    cls = MODULES[method]
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        linear = model.get_submodule(name)
        module = (
            cls.from_linear(linear)
            if from_weights
            else cls(linear.in_features, linear.out_features, linear.bias is not None)
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return names


def _is_tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is emb.weight


def quantize(model: nn.Module, method: str, calibration=None) -> nn.Module:
    """An int8 copy of `model` (on CPU, eval mode); every Linear and Conv1D is quantized.
    `static_int8` needs `calibration`: an iterable of (B, T) token-id batches."""
    if method not in METHODS:
        raise DataError(f"quantize.method: {method!r} is not one of {', '.join(METHODS)}")
    model = conv1d_to_linear(copy.deepcopy(model).cpu().float().eval())
    tied = _is_tied(model)
    input_scales = {}
    if method == "static_int8":
        if calibration is None:
            raise DataError("quantize.method: static_int8 needs calibration windows")
        input_scales = calibrate_input_scales(model, calibration)
    quantized = _replace_linears(model, method, from_weights=True)
    for name, input_scale in input_scales.items():
        model.get_submodule(name).input_scale = input_scale
    if tied:
        _embedding_from_head(model)
    model.llmpipe_quantization = {
        "method": method,
        "tied_embedding": tied,
        "quantized_modules": quantized,
    }
    return model


def _embedding_from_head(model: nn.Module) -> None:
    """Tied weights: the embedding becomes the dequantized int8 head, so it is stored once."""
    head = model.get_output_embeddings()
    model.get_input_embeddings().weight = nn.Parameter(
        head.dequantized_weight(), requires_grad=False
    )


def _embedding_key(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(f"{name}.weight" for name, m in model.named_modules() if m is embedding)


def save_quantized(model: nn.Module, out_dir: Path, tokenizer=None, source: str = "") -> None:
    """Plain tensors in safetensors plus a JSON recipe; no pickle."""
    from safetensors.torch import save_file

    recipe = {"format_version": FORMAT_VERSION, **model.llmpipe_quantization, "source": source}
    skip = _embedding_key(model) if recipe["tied_embedding"] else None
    tensors = {
        key: value.detach().contiguous() for key, value in model.state_dict().items() if key != skip
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def load_quantized(model_dir: Path) -> nn.Module:
    """Rebuild a model saved by `save_quantized`: same outputs as before saving."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / RECIPE_FILE).exists():
        raise DataError(f"{model_dir}: no {RECIPE_FILE} (not a quantized model directory)")
    recipe = json.loads((model_dir / RECIPE_FILE).read_text())
    if recipe.get("format_version") != FORMAT_VERSION or recipe.get("method") not in METHODS:
        raise DataError(
            f"{model_dir / RECIPE_FILE}: format {recipe.get('format_version')} "
            f"method {recipe.get('method')!r} is not one this version reads "
            f"(format {FORMAT_VERSION}, {', '.join(METHODS)}); "
            "rerun the quantize stage"
        )
    config = AutoConfig.from_pretrained(model_dir)
    model = conv1d_to_linear(AutoModelForCausalLM.from_config(config).eval())
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    quantized = _replace_linears(model, recipe["method"], from_weights=False)
    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    embedding_key = _embedding_key(model) if recipe["tied_embedding"] else None
    missing = [k for k in missing if k != embedding_key]
    if unexpected or missing:
        raise DataError(
            f"{model_dir / WEIGHTS_FILE}: does not fit its config "
            f"(unexpected {unexpected[:5]}, missing {missing[:5]})"
        )
    if recipe["tied_embedding"]:
        _embedding_from_head(model)
    model.llmpipe_quantization = {
        "method": recipe["method"],
        "tied_embedding": recipe["tied_embedding"],
        "quantized_modules": quantized,
    }
    return model


def measurement_device(requested: str, method: str) -> str:
    """quantize.device: auto is the GPU when there is one, the method runs there (weight-only
    int8) and torchao is installed for it; else the CPU. The metrics name the one taken."""
    import importlib.util

    # A GPU torch cannot use is an error, not a quiet measurement on the CPU (runtime.use_cuda).
    cuda = runtime.use_cuda(requested, "quantize.device")
    torchao = importlib.util.find_spec("torchao") is not None
    if requested == "cuda" and not torchao:
        raise ParamsError(
            "quantize.device: 'cuda' needs torchao for its int8 kernels (pip install -e '.[gpu]')"
        )
    if requested == "auto":
        if cuda and method == "weight_only_int8" and not torchao:
            print(
                "quantize.device: auto measures int8 on the CPU: torchao, for the GPU's int8 "
                "kernels, is not installed (pip install -e '.[gpu]')",
                flush=True,
            )
        return "cuda" if cuda and torchao and method == "weight_only_int8" else "cpu"
    return requested


def load_for_inference(model_dir: Path, requested_device: str = "auto") -> nn.Module:
    """A saved int8 model, on the device its method runs on (measurement_device)."""
    model = load_quantized(model_dir)
    return on_device(
        model, measurement_device(requested_device, model.llmpipe_quantization["method"])
    )


def on_device(model: nn.Module, device: str) -> nn.Module:
    """The quantized model where it is measured: these modules on the CPU; on a GPU, torchao's
    int8 weight-only kernels (weight_only_int8 only: the int8-activation methods are CPU
    kernels here, torch._int_mm on CUDA needs more than 16 rows)."""
    if device == "cpu":
        return model
    method = model.llmpipe_quantization["method"]
    if method != "weight_only_int8":
        raise ParamsError(
            f"quantize.method: {method} runs on the CPU only; on {device} use "
            "weight_only_int8 (torchao's kernels), or set quantize.device: cpu"
        )
    return to_torchao_weight_only(model).to(device)


def to_torchao_weight_only(model: nn.Module) -> nn.Module:
    """The weight-only int8 model with torchao's kernels: each int8 module goes back to an
    nn.Linear of its dequantized weight, which torchao's Int8WeightOnlyConfig quantizes again
    per output channel. Its scales differ slightly from ours, so the weights are rounded
    twice: on the micro model of the tests, the logits' error to fp32 is about 2x ours."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise ParamsError(
            "quantize.device: a GPU needs torchao for its int8 kernels (pip install -e '.[gpu]')"
        ) from e
    for name, module in list(model.named_modules()):
        if isinstance(module, WeightOnlyInt8Linear):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
    quantize_(model, Int8WeightOnlyConfig())
    return model


PERPLEXITY_KEYS = ("val_perplexity", "val_perplexity_lo", "val_perplexity_hi")


def compare_to_fp32(
    fp32: nn.Module,
    int8: nn.Module,
    bench: InferenceBench,
    fp32_file: Path,
    int8_file: Path,
    items_file: Path | None = None,
) -> dict:
    """The quantize stage's metrics: size, perplexity, top-1 agreement and speed of the int8
    model against its fp32 source, measured in one process on the same inputs and threads.
    Every generation speedup is against fp32 eager `generate`, where users start from.
    `items_file`: the loss per validation window of both (fp32 "before", int8 "after")."""
    figures = {
        name: inference_figures(model, bench) for name, model in (("fp32", fp32), ("int8", int8))
    }
    scores = {name: f.pop("score") for name, f in figures.items()}
    if items_file is not None:
        write_items(items_file, *({"items": scores[name].items()} for name in ("fp32", "int8")))
    fp32_mb, int8_mb = fp32_file.stat().st_size / 1e6, int8_file.stat().st_size / 1e6
    ppl32, ppl8 = figures["fp32"]["val_perplexity"], figures["int8"]["val_perplexity"]
    bpb32, bpb8 = figures["fp32"]["val_bits_per_byte"], figures["int8"]["val_bits_per_byte"]
    tokens_per_s = {f"{name}_eager": f["generate_tokens_per_s"] for name, f in figures.items()}
    if bench.compiled:
        tokens_per_s.update(
            {f"{name}_compiled": f["compiled_generate_tokens_per_s"] for name, f in figures.items()}
        )
    baseline = tokens_per_s["fp32_eager"]
    return {
        "fp32_size_mb": fp32_mb,
        "int8_size_mb": int8_mb,
        "size_ratio": int8_mb / fp32_mb,
        **{f"{name}_{key}": f[key] for name, f in figures.items() for key in PERPLEXITY_KEYS},
        "perplexity_change_percent": 100 * (ppl8 / ppl32 - 1),
        # paired over the same windows: what int8 costs, with its interval
        **loss_change_metrics(scores["fp32"], scores["int8"], "val_loss_change"),
        "fp32_val_bits_per_byte": bpb32,
        "int8_val_bits_per_byte": bpb8,
        "top1_agreement": top1_agreement(
            int8, fp32, bench.val, bench.block_size, bench.windows, bench.batch_size
        ),
        "perf": {
            "device": str(next(int8.parameters()).device),  # every figure: both models there
            "threads": torch.get_num_threads(),
            "fp32_forward_ms": figures["fp32"]["forward_ms"],
            "int8_forward_ms": figures["int8"]["forward_ms"],
            "forward_speedup": figures["fp32"]["forward_ms"] / figures["int8"]["forward_ms"],
            "generate_tokens_per_s": tokens_per_s,
            "generate_speedup_vs_fp32_eager": {
                k: v / baseline for k, v in tokens_per_s.items() if k != "fp32_eager"
            },
        },
    }

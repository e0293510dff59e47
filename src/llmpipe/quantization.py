"""Post-training int8 quantization of a Hugging Face causal LM for CPU inference.

GPT-2's projections are transformers' `Conv1D` (weight (in, out)), which PyTorch's quantizers
skip: they are converted to `nn.Linear` first (an exact transpose), so that every projection of
every block is quantized, not only the head. Methods:

- `dynamic_int8`: int8 weights (per output channel) and activations quantized at run time, with
  `torch.ao.quantization.quantize_dynamic` (fbgemm/onednn int8 kernels on CPU).
- `weight_only_int8`: int8 weights (per output channel), dequantized to fp32 at each matmul: a
  smaller model on disk and in memory, no faster on CPU (on a GPU, torchao's int8 weight-only
  kernels are the path for memory-bound decoding).

Saved form, loadable without pickle: `quantized.safetensors` holds plain tensors (int8 weights
with their scales and zero points, everything else in fp32), `quantization.json` the recipe, and
the config and tokenizer sit beside. With tied embeddings, the token embedding is not stored
twice: it is rebuilt from the int8 head (a per-row int8 embedding), which is what brings the
file under half the fp32 size.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from llmpipe.errors import DataError

METHODS = ("dynamic_int8", "weight_only_int8")
WEIGHTS_FILE = "quantized.safetensors"
RECIPE_FILE = "quantization.json"


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


class WeightOnlyInt8Linear(nn.Module):
    """A Linear whose weight is stored in int8 (per output channel) and dequantized per call."""

    def __init__(self, qweight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.qweight = qweight
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.dequantize(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


def _quantize_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 per output channel (row)."""
    weight = weight.detach()
    scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
    return torch.quantize_per_channel(weight.float(), scales.double(),
                                      torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _is_tied(model: nn.Module) -> bool:
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and out.weight is emb.weight


def _qlinear(method: str, qweight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if method == "weight_only_int8":
        return WeightOnlyInt8Linear(qweight, bias)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    module = DynamicQuantizedLinear(qweight.shape[1], qweight.shape[0], dtype=torch.qint8)
    module.set_weight_bias(qweight, bias)
    return module


def _qweight_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, WeightOnlyInt8Linear):
        return module.qweight, module.bias
    return module.weight(), module.bias()


def quantize(model: nn.Module, method: str) -> nn.Module:
    """An int8 copy of `model` (on CPU, eval mode); every Linear and Conv1D is quantized."""
    if method not in METHODS:
        raise DataError(f"quantize.method: {method!r} is not one of {', '.join(METHODS)}")
    model = conv1d_to_linear(copy.deepcopy(model).cpu().float().eval())
    tied = _is_tied(model)
    if method == "dynamic_int8":
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

            quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8,
                             inplace=True)
    else:
        for name in _linear_names(model):
            linear = model.get_submodule(name)
            bias = None if linear.bias is None else linear.bias.detach().clone()
            _set_module(model, name, _qlinear(method, _quantize_per_channel(linear.weight), bias))
    if tied:
        _embedding_from_head(model)
    model.llmpipe_quantization = {"method": method, "tied_embedding": tied}
    return model


def _embedding_from_head(model: nn.Module) -> None:
    """Tied weights: the embedding becomes the dequantized int8 head, so it is stored once."""
    head_q, _ = _qweight_of(model.get_output_embeddings())
    model.get_input_embeddings().weight = nn.Parameter(head_q.dequantize(), requires_grad=False)


def save_quantized(model: nn.Module, out_dir: Path, tokenizer=None, source: str = "") -> None:
    """Plain tensors in safetensors plus a JSON recipe; no pickle."""
    from safetensors.torch import save_file

    recipe = dict(model.llmpipe_quantization)
    tensors: dict[str, torch.Tensor] = {}
    quantized = []
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyInt8Linear) or _is_dynamic_qlinear(module):
            qweight, bias = _qweight_of(module)
            tensors[f"{name}.qweight"] = qweight.int_repr().contiguous()
            tensors[f"{name}.scales"] = qweight.q_per_channel_scales().float().contiguous()
            tensors[f"{name}.zero_points"] = qweight.q_per_channel_zero_points().contiguous()
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().float().contiguous()
            quantized.append(name)
    prefixes = tuple(f"{name}." for name in quantized)
    embedding_key = _embedding_key(model) if recipe["tied_embedding"] else None
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or key == embedding_key or not torch.is_tensor(value):
            continue
        tensors[key] = value.detach().contiguous()
    recipe.update({"source": source, "quantized_modules": quantized})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / WEIGHTS_FILE))
    (out_dir / RECIPE_FILE).write_text(json.dumps(recipe, indent=2) + "\n")
    model.config.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def _is_dynamic_qlinear(module: nn.Module) -> bool:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return isinstance(module, DynamicQuantizedLinear)


def _embedding_key(model: nn.Module) -> str:
    embedding = model.get_input_embeddings()
    return next(f"{name}.weight" for name, m in model.named_modules() if m is embedding)


def load_quantized(model_dir: Path) -> nn.Module:
    """Rebuild a model saved by `save_quantized`: same outputs as before saving."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    model_dir = Path(model_dir)
    if not (model_dir / RECIPE_FILE).exists():
        raise DataError(f"{model_dir}: no {RECIPE_FILE} (not a quantized model directory)")
    recipe = json.loads((model_dir / RECIPE_FILE).read_text())
    config = AutoConfig.from_pretrained(model_dir)
    model = conv1d_to_linear(AutoModelForCausalLM.from_config(config).eval())
    model.generation_config = GenerationConfig.from_pretrained(model_dir)
    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    quantized = {name: {part: tensors.pop(f"{name}.{part}", None)
                        for part in ("qweight", "scales", "zero_points", "bias")}
                 for name in recipe["quantized_modules"]}
    # The float tensors first: quantized modules refuse a state dict without their own keys.
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    prefixes = tuple(f"{name}." for name in quantized)
    embedding_key = _embedding_key(model) if recipe["tied_embedding"] else None
    missing = [k for k in missing if not k.startswith(prefixes) and k != embedding_key]
    if unexpected or missing:
        raise DataError(f"{model_dir / WEIGHTS_FILE}: does not fit its config "
                        f"(unexpected {unexpected[:5]}, missing {missing[:5]})")
    for name, parts in quantized.items():
        qweight = torch._make_per_channel_quantized_tensor(
            parts["qweight"], parts["scales"].double(), parts["zero_points"], 0)
        _set_module(model, name, _qlinear(recipe["method"], qweight, parts["bias"]))
    if recipe["tied_embedding"]:
        _embedding_from_head(model)
    model.llmpipe_quantization = {k: recipe[k] for k in ("method", "tied_embedding")}
    return model


def size_on_disk_mb(model_dir: Path, files: tuple[str, ...]) -> float:
    return sum((Path(model_dir) / f).stat().st_size for f in files) / 1e6

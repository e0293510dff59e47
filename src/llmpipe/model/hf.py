"""Conversion between ``llmpipe.model.GPT`` and Hugging Face's ``GPT2LMHeadModel``.

Both use the same parameter names. The only difference is that Hugging Face keeps
the attention and MLP projections in ``transformers.pytorch_utils.Conv1D``, whose
weight is stored (in, out) where ``nn.Linear`` stores (out, in), so those weights
are transposed on the way across.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from llmpipe.model.gpt import GPT, LAYER_NORM_EPS, GPTConfig

_CONV1D_WEIGHT_SUFFIXES = (
    "attn.c_attn.weight",
    "attn.c_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)
# Both names denote the tanh approximation of GELU that GPT.MLP uses.
_TANH_GELU_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")


def _to_other_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Transpose Conv1D <-> Linear weights; the transpose is its own inverse."""
    return tensor.t() if name.endswith(_CONV1D_WEIGHT_SUFFIXES) else tensor


def _check_convertible(hf_config: GPT2Config) -> None:
    """Reject GPT-2 variants whose architecture GPT cannot reproduce exactly."""
    problems = []
    if hf_config.activation_function not in _TANH_GELU_ACTIVATIONS:
        problems.append(f"activation_function={hf_config.activation_function!r}")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        problems.append(f"n_inner={hf_config.n_inner} (GPT uses 4 * n_embd)")
    if hf_config.layer_norm_epsilon != LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon={hf_config.layer_norm_epsilon}")
    if not hf_config.scale_attn_weights or hf_config.scale_attn_by_inverse_layer_idx:
        problems.append("attention scaling other than 1/sqrt(head_size)")
    if hf_config.add_cross_attention:
        problems.append("cross-attention")
    if not hf_config.tie_word_embeddings:
        problems.append("untied lm_head")
    if problems:
        raise ValueError("Cannot convert this GPT-2 model: " + ", ".join(problems))


def gpt_from_hf_model(hf_model: GPT2LMHeadModel, dropout: float = 0.0) -> GPT:
    """Convert an in-memory Hugging Face GPT-2 into a ``GPT`` with identical outputs.

    ``dropout`` is not taken from the Hugging Face config: pretrained checkpoints
    carry their pre-training value (0.1 for gpt2), while fine-tuning usually wants
    none, so the caller decides.
    """
    hf_config = hf_model.config
    _check_convertible(hf_config)
    config = GPTConfig(
        vocab_size=hf_config.vocab_size,
        block_size=hf_config.n_positions,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        dropout=dropout,
        bias=True,
    )
    model = GPT(config)
    hf_state = hf_model.state_dict()
    # Iterating over our names skips any non-parameter buffers Hugging Face may add.
    state = {name: _to_other_layout(name, hf_state[name]) for name in model.state_dict()}
    model.load_state_dict(state, strict=True)
    return model


def load_hf_gpt2(name_or_path: str, trust_remote_code: bool = False, dropout: float = 0.0) -> GPT:
    """Load a GPT-2 checkpoint (Hub name or local directory) as a ``GPT``."""
    hf_model = GPT2LMHeadModel.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    return gpt_from_hf_model(hf_model, dropout=dropout)


def hf_model_from_gpt(model: GPT, eos_token_id: int | None = None) -> GPT2LMHeadModel:
    """Convert a ``GPT`` into an equivalent Hugging Face ``GPT2LMHeadModel`` (eval mode)."""
    config = model.config
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=LAYER_NORM_EPS,
        # Left unset, transformers falls back to GPT-2's 50256 and warns when that
        # lies outside our vocabulary.
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    state = model.state_dict()
    hf_state = {}
    for name, hf_tensor in hf_model.state_dict().items():
        if name in state:
            tensor = state[name]
            if name in ("transformer.wte.weight", "lm_head.weight"):
                tensor = tensor[: config.vocab_size]  # without the padding rows
            hf_state[name] = _to_other_layout(name, tensor)
        elif name.endswith(".bias") and not config.bias:
            # GPT-2 always has biases; all-zero biases compute the same as none.
            hf_state[name] = torch.zeros_like(hf_tensor)
        else:
            raise KeyError(f"No GPT parameter for Hugging Face parameter {name!r}")
    hf_model.load_state_dict(hf_state, strict=True)
    return hf_model.eval()


def export_hf_gpt2(
    model: GPT,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    eos_token_id: int | None = None,
) -> Path:
    """Save ``model`` as a Hugging Face GPT-2 checkpoint loadable by ``from_pretrained``.

    Writes config.json and model.safetensors (transformers 5 saves safetensors
    only), plus the tokenizer files when ``tokenizer`` is given. ``eos_token_id``
    defaults to the tokenizer's and also serves as BOS and padding id, as in GPT-2.
    Returns the output directory.
    """
    out_dir = Path(out_dir)
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    hf_model = hf_model_from_gpt(model, eos_token_id=eos_token_id)
    hf_model.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir

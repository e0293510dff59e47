"""Loading Hugging Face causal LMs, reward models and tokenizers: from the pipeline's own model
directories, any model directory, or the hub (`hf:<name>`). Weights are read from safetensors
only, and `trust_remote_code` is off unless a param turns it on."""

from __future__ import annotations

from pathlib import Path

from llmpipe import layout
from llmpipe.errors import DataError
from llmpipe.runtime import default_device


def model_location(spec: str) -> str:
    """`pretrain` -> the pretrain stage's model directory; `hf:<name>` -> a hub name; else a
    directory."""
    if spec == "pretrain":
        return str(layout.PRETRAIN_MODEL)
    return spec.removeprefix("hf:")


def load_causal_lm(spec: str | Path, trust_remote_code: bool = False, device: str = "auto"):
    """A causal LM (on the GPU when there is one and device is auto) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(spec)
    name = model_location(spec)
    if not spec.startswith("hf:") and not Path(name).is_dir():
        raise DataError(
            f"base model {spec!r}: no directory {name} (run the pretrain stage "
            "first, or set base to hf:<name> or a model directory)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"base model {spec!r}: cannot load ({e})") from e
    return model.to(default_device() if device == "auto" else device), tokenizer


def token_vocab_size(model, tokenizer) -> int:
    """The token ids a model reads: its tokenizer's count where the embedding matrix has more
    rows (Qwen2.5 pads it to a multiple of 128: 151,936 rows for 151,665 tokens), else the
    matrix's rows. Token data from another vocabulary differs from it."""
    return min(len(tokenizer), model.get_input_embeddings().num_embeddings)


def load_tokenizer(model_dir: str | Path):
    """A model directory's tokenizer, padding with end-of-text where it has no pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_reward_model(model_dir: str | Path, tokenizer):
    """A one-output sequence classifier; it reads the last token that is not padding, in
    training and in scoring alike (the sequences themselves: llmpipe.data.chat)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, use_safetensors=True
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(default_device())

"""GGUF export: a Hugging Face GPT-2 directory as one GGUF file that llama.cpp (and Ollama) run,
written with the `gguf` package (llama.cpp's own Python writer), as llama.cpp's
convert_hf_to_gguf.py writes GPT-2: the same tensor names (gguf's tensor map), Conv1D weights
transposed to (out, in), the attention's bias buffers dropped, the head left out where it is the
tied embedding (llama.cpp's GPT-2 then reads token_embd), 1-D tensors and the position
embedding in F32, the rest in F16 or Q8_0 (F16 where a row is not a whole number of Q8_0's
32-value blocks).

The tokenizer goes in as llama.cpp's `gpt2` BPE: the byte-level tokens in id order, the merges,
end-of-text as a control token, and the pre-tokenizer `gpt-2`. llama.cpp's converter picks the
pre-tokenizer by hashing what a tokenizer makes of a probe text, and knows only the hub's
tokenizers; the pipeline's BPE is not one of them, but it splits as GPT-2's does (tokenizers'
ByteLevel pre-tokenizer with GPT-2's regex, `data.tokenization`), which `check_gpt2_split`
verifies before it says so.

The check that needs no llama.cpp: `NumpyGpt2` runs GPT-2's forward in plain NumPy over a
file's tensors, to compare its logits and greedy tokens with the HF model's. The gguf stage
records both for every file, over the values it wrote (the file's bytes, dequantized; parsing
a 4,096-token vocabulary back takes gguf's reader a third of a second a file); tests/test_gguf.py
reads the file back with gguf's reader and holds F16 to 0.02.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpipe.errors import DataError

FILE_TYPES = ("f16", "q8_0")
# Transposed from HF's Conv1D (in, out) to the (out, in) of a linear layer, as llama.cpp's
# converter does for GPT-2.
CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
DROPPED = (".attn.bias", ".attn.masked_bias")  # the causal mask buffers of older checkpoints
PRE_TOKENIZER = "gpt-2"


def _gguf():
    import gguf  # imported where used: the stage's one heavy optional import

    return gguf


def check_gpt2_architecture(config: dict, where: Path) -> None:
    """What llama.cpp's GPT-2 graph computes, or a one-line error naming the field."""
    problems = []
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type: {config.get('model_type')!r} (only gpt2 is exported)")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(
            f"activation_function: {config['activation_function']!r} (llama.cpp's GPT-2 uses "
            "the tanh GELU)"
        )
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if config.get(flag):
            problems.append(f"{flag}: true (llama.cpp's GPT-2 has no such attention)")
    if config.get("scale_attn_weights", True) is False:
        problems.append("scale_attn_weights: false (llama.cpp scales by 1/sqrt(head size))")
    if problems:
        raise DataError(f"{where / 'config.json'}: {problems[0]}")


def check_gpt2_split(tokenizer_file: Path) -> None:
    """The tokenizer pre-splits text as GPT-2's does: a ByteLevel pre-tokenizer with its regex
    and no prefix space, a byte-level BPE model (what `tokenizer.ggml.pre = gpt-2` promises)."""
    spec = json.loads(tokenizer_file.read_text())
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    if not (
        pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
        and model.get("type") == "BPE"
        and not spec.get("normalizer")
    ):
        raise DataError(
            f"{tokenizer_file}: pre_tokenizer: {pre.get('type')!r} does not split as GPT-2's "
            "(a ByteLevel BPE with GPT-2's regex and no normalizer), so llama.cpp's gpt-2 "
            "pre-tokenizer would read other tokens"
        )


def _merges(tokenizer_file: Path) -> list[str]:
    merges = json.loads(tokenizer_file.read_text())["model"]["merges"]
    # tokenizers writes a merge as "a b" (older files) or ["a", "b"]
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


@dataclass(frozen=True)
class Written:
    path: Path
    bytes: int
    tensor_types: dict[str, str]  # name -> GGML type, as written
    hparams: dict  # the architecture's metadata, as written (NumpyGpt2 reads three)
    tensors: dict[str, np.ndarray]  # the values the file holds (F16 or Q8_0 rounded), float32


def write_gguf(model_dir: Path, out_file: Path, file_type: str, name: str) -> Written:
    """The model directory as one GGUF file of `file_type` (f16 or q8_0)."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    gguf = _gguf()
    config = json.loads((model_dir / "config.json").read_text())
    check_gpt2_architecture(config, model_dir)
    tokenizer_file = model_dir / "tokenizer.json"
    check_gpt2_split(tokenizer_file)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    weights = load_file(model_dir / "model.safetensors")
    n_layer, n_embd = config["n_layer"], config["n_embd"]
    tensor_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, n_layer)
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}
    ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    writer.add_name(name)
    writer.add_block_count(n_layer)
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(config.get("n_inner") or 4 * n_embd)
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(ftype[file_type])

    rows = weights["transformer.wte.weight"].shape[0]
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    types = [
        gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
        for i in range(len(tokens))
    ]
    # An embedding padded beyond the tokenizer (a multiple of 64, say): unused ids, as the
    # converter writes them.
    tokens += [f"[PAD{i}]" for i in range(len(tokens), rows)]
    types += [gguf.TokenType.UNUSED] * (rows - len(types))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer_file))
    for kind in ("bos", "eos", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(False)  # GPT-2's tokenizer adds nothing

    tied = "lm_head.weight" not in weights or np.array_equal(
        weights["lm_head.weight"], weights["transformer.wte.weight"]
    )
    written, stored = {}, {}
    for hf_name, tensor in weights.items():
        if hf_name.endswith(DROPPED) or (hf_name == "lm_head.weight" and tied):
            continue
        gguf_name = tensor_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise DataError(f"{model_dir / 'model.safetensors'}: {hf_name}: no GGUF name for it")
        data = tensor.astype(np.float32)
        if hf_name.endswith(CONV1D):
            data = np.ascontiguousarray(data.T)
        kind = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and gguf_name != "position_embd.weight":
            kind = qtype[file_type]
            if kind == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                kind = gguf.GGMLQuantizationType.F16  # rows not whole Q8_0 blocks
        if kind == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name, data)
            stored[gguf_name] = data
        elif kind == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(gguf_name, data.astype(np.float16))
            stored[gguf_name] = data.astype(np.float16).astype(np.float32)
        else:
            blocks = gguf.quants.quantize(data, kind)
            writer.add_tensor(gguf_name, blocks, raw_dtype=kind)
            stored[gguf_name] = gguf.quants.dequantize(blocks, kind).reshape(data.shape)
        written[gguf_name] = kind.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    hparams = {
        "gpt2.block_count": n_layer,
        "gpt2.attention.head_count": config["n_head"],
        # as the file holds it: a float32
        "gpt2.attention.layer_norm_epsilon": float(
            np.float32(config.get("layer_norm_epsilon", 1e-5))
        ),
    }
    return Written(out_file, out_file.stat().st_size, written, hparams, stored)


# --- reading back ----------------------------------------------------------------------------


def read_gguf(path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """(metadata, tensors as float32 in the file's numpy shape) with gguf's own reader; Q8_0
    tensors dequantized."""
    gguf = _gguf()
    reader = gguf.GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):  # the header's own fields
            metadata[key] = field.contents()
    tensors = {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.tensor_type in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            array = data.astype(np.float32)
        else:
            array = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # ggml's ne, reversed
        tensors[tensor.name] = array.reshape(shape)
    return metadata, tensors


class NumpyGpt2:
    """GPT-2's forward in plain NumPy over a GGUF file's tensors (float32 arithmetic): what
    llama.cpp's GPT-2 graph computes, with nothing of torch or transformers. From the file
    (`from_file`: gguf's reader) or from what `write_gguf` wrote (`Written`: the same values,
    without parsing the file's vocabulary again)."""

    @classmethod
    def from_file(cls, path: Path) -> NumpyGpt2:
        return cls(*read_gguf(path))

    @classmethod
    def from_written(cls, written: Written) -> NumpyGpt2:
        return cls(written.hparams, written.tensors)

    def __init__(self, metadata: dict, tensors: dict[str, np.ndarray]):
        self.metadata, self.t = metadata, tensors
        self.n_layer = int(self.metadata["gpt2.block_count"])
        self.n_head = int(self.metadata["gpt2.attention.head_count"])
        self.eps = float(self.metadata["gpt2.attention.layer_norm_epsilon"])
        self.output = self.t.get("output.weight", self.t["token_embd.weight"])

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + self.eps) * self.t[f"{name}.weight"] + self.t[
            f"{name}.bias"
        ]

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.t[f"{name}.weight"].T + self.t[f"{name}.bias"]

    def logits(self, ids: list[int]) -> np.ndarray:
        """(len(ids), vocab) next-token logits."""
        n = len(ids)
        x = self.t["token_embd.weight"][ids] + self.t["position_embd.weight"][:n]
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), k=1)
        for b in range(self.n_layer):
            h = self._norm(x, f"blk.{b}.attn_norm")
            q, k, v = np.split(self._linear(h, f"blk.{b}.attn_qkv"), 3, axis=-1)
            d = q.shape[-1] // self.n_head
            q, k, v = (a.reshape(n, self.n_head, d).transpose(1, 0, 2) for a in (q, k, v))
            scores = q @ k.transpose(0, 2, 1) / np.sqrt(d) + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            y = (scores / scores.sum(-1, keepdims=True)) @ v
            x = x + self._linear(y.transpose(1, 0, 2).reshape(n, -1), f"blk.{b}.attn_output")
            h = self._linear(self._norm(x, f"blk.{b}.ffn_norm"), f"blk.{b}.ffn_up")
            h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
            x = x + self._linear(h, f"blk.{b}.ffn_down")
        return self._norm(x, "output_norm") @ self.output.T

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        ids = list(ids)
        for _ in range(new_tokens):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[-new_tokens:]


# --- the check: another implementation's logits against the HF model's -----------------------


@dataclass(frozen=True)
class HfReference:
    """The HF model's greedy continuation of a prompt, `new_tokens` long (past an end-of-text
    too: more positions to compare), and its logits over prompt and continuation."""

    prompt_length: int
    ids: list[int]
    logits: np.ndarray  # (len(ids), vocab)

    @classmethod
    def of(cls, model, tokenizer, prompt: str, new_tokens: int) -> HfReference:
        import torch

        prompt_ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=tokenizer.eos_token_id,
            )
            logits = model(out).logits[0].float().numpy()
        return cls(len(prompt_ids), out[0].tolist(), logits)

    def agreement(self, logits: np.ndarray) -> dict:
        """Other logits over the same ids against these: the largest difference, the share of
        the continuation's positions where both pick the same likeliest next token, and where
        they do not, how close the HF model's two likeliest were (a near tie that any other
        arithmetic may break the other way)."""
        predicting = slice(self.prompt_length - 1, len(self.ids) - 1)
        ours, theirs = logits[predicting].argmax(-1), self.logits[predicting].argmax(-1)
        top2 = np.sort(self.logits[predicting], axis=-1)[:, -2:]
        margins = (top2[:, 1] - top2[:, 0])[ours != theirs]
        return {
            "max_abs_logit_diff": float(np.abs(logits - self.logits).max()),
            "greedy_agreement": float((ours == theirs).mean()),
            "hf_top2_margin_where_not": float(margins.max()) if len(margins) else None,
        }

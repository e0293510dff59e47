"""gguf: the trained models as GGUF files for llama.cpp and Ollama (F16 and Q8_0), each checked
on the spot: a plain NumPy forward over the file's own tensors against the HF model, along the
HF model's `check_tokens` greedy tokens after the check prompt (llmpipe.export.gguf)."""

import time

import numpy as np
import torch

from llmpipe import layout
from llmpipe.export.gguf import NumpyGpt2, write_gguf
from llmpipe.export.params import GgufParams
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main


def hf_reference(model_dir, prompt: str, new_tokens: int) -> tuple[int, list[int], np.ndarray]:
    """The HF model's greedy continuation of the prompt: (prompt length, prompt + continuation
    ids, its logits over them)."""
    model, tokenizer = load_causal_lm(model_dir)
    model.eval()
    prompt_ids = tokenizer(prompt).input_ids
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,  # past an end-of-text too: more positions to compare
            pad_token_id=tokenizer.eos_token_id,
        )
        logits = model(out).logits[0].float().numpy()
    return len(prompt_ids), out[0].tolist(), logits


def compare(numpy_model: NumpyGpt2, start: int, ids: list[int], hf_logits: np.ndarray) -> dict:
    """The file's logits against the HF model's along the HF model's greedy continuation (one
    forward pass each): the largest difference, the share of positions where both pick the same
    likeliest next token, and where they do not, how close the HF model's two likeliest were (a
    near tie that any other arithmetic may break the other way)."""
    logits = numpy_model.logits(ids)
    predicting = slice(start - 1, len(ids) - 1)  # the positions that pick the continuation
    ours, theirs = logits[predicting].argmax(-1), hf_logits[predicting].argmax(-1)
    top2 = np.sort(hf_logits[predicting], axis=-1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[ours != theirs]
    return {
        "max_abs_logit_diff": float(np.abs(logits - hf_logits).max()),
        "greedy_agreement": float((ours == theirs).mean()),
        "hf_top2_margin_where_not": float(margins.max()) if len(margins) else None,
    }


def main() -> None:
    started = time.perf_counter()
    _, p = load_stage_params(GgufParams)
    files = {}
    with atomic_dir(layout.GGUF) as tmp:
        for name in p.models:
            model_dir = layout.MODEL_OUTPUTS[name]
            start, ids, hf_logits = hf_reference(model_dir, p.check_prompt, p.check_tokens)
            for file_type in p.file_types:
                written = write_gguf(model_dir, tmp / f"{name}-{file_type}.gguf", file_type, name)
                row = {
                    "size_mb": written.bytes / 1e6,
                    **compare(NumpyGpt2(written.path), start, ids, hf_logits),
                }
                files[f"{name}-{file_type}"] = row
                where_not = row["hf_top2_margin_where_not"]
                print(
                    f"{name} {file_type}: {row['size_mb']:.2f} MB, max |logit - HF's| "
                    f"{row['max_abs_logit_diff']:.4f}, the same likeliest token: "
                    f"{row['greedy_agreement']:.0%}"
                    + (f" (the others HF's near ties, <= {where_not:.4f})" if where_not else "")
                    + f" -> {layout.GGUF / written.path.name}",
                    flush=True,
                )
    write_metrics(
        "gguf",
        {
            "check_tokens": p.check_tokens,
            "files": files,
            "perf": {"wall_s": time.perf_counter() - started},
        },
    )


if __name__ == "__main__":
    run_main(main)

"""gguf: the trained models as GGUF files for llama.cpp and Ollama (F16 and Q8_0), each checked
on the spot: a plain NumPy forward over the file's own tensors against the HF model, along the
HF model's `check_tokens` greedy tokens after the check prompt (llmpipe.export.gguf)."""

import time

from llmpipe import layout
from llmpipe.export.gguf import HfReference, NumpyGpt2, write_gguf
from llmpipe.export.params import GgufParams
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.model.loading import load_causal_lm
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main


def main() -> None:
    started = time.perf_counter()
    _, p = load_stage_params(GgufParams)
    files = {}
    with atomic_dir(layout.GGUF) as tmp:
        for name in p.models:
            model_dir = layout.MODEL_OUTPUTS[name]
            model, tokenizer = load_causal_lm(model_dir)
            reference = HfReference.of(model.eval(), tokenizer, p.check_prompt, p.check_tokens)
            for file_type in p.file_types:
                written = write_gguf(model_dir, tmp / f"{name}-{file_type}.gguf", file_type, name)
                row = {
                    "size_mb": written.bytes / 1e6,
                    **reference.agreement(NumpyGpt2.from_written(written).logits(reference.ids)),
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

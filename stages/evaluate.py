"""evaluate: every model the pipeline made, on the same held-out data and prompts, in one
table; then the report card."""

from pathlib import Path

from llmpipe.causal_lm import load_base
from llmpipe.data import TokenBin
from llmpipe.evaluation import generation_tokens_per_s, perplexity, window_loss
from llmpipe.io import atomic_dir, read_jsonl, write_json, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.preferences import sample_completions
from llmpipe.quantization import WEIGHTS_FILE, load_quantized
from llmpipe.report import write_report
from llmpipe.rlhf import load_judges, load_tokenizer, policy_report
from llmpipe.stage import run_main

# name -> (directory, weights file); the quantized model has its own loader.
MODELS = {
    "pretrain": (Path("data/pretrain/model"), "model.safetensors"),
    "finetune": (Path("data/finetune/model"), "model.safetensors"),
    "lora": (Path("data/lora/merged"), "model.safetensors"),
    "quantized": (Path("data/quantize/model"), WEIGHTS_FILE),
    "grpo": (Path("data/grpo/model"), "model.safetensors"),
}
REFERENCE = "finetune"  # the SFT policy: KL is measured against it
TOKENS_DIR = Path("data/tokens")
PREFERENCES_DIR = Path("data/preferences")
REWARD_DIR = Path("data/reward_model/model")
OUT_DIR = Path("data/evaluate")
PLOT_ROWS = Path("metrics/evaluate_models.json")


def load_model(name: str):
    directory, _ = MODELS[name]
    if name == "quantized":
        return load_quantized(directory), load_tokenizer(directory)
    model, tokenizer = load_base(str(directory))
    return model.eval(), tokenizer


def main() -> None:
    shared, p = load_stage_params("evaluate")
    heldout = [r["prompt"] for r in read_jsonl(PREFERENCES_DIR / "prompts_heldout.jsonl")]
    gold, reward_model, reward_tokenizer = load_judges(PREFERENCES_DIR, REWARD_DIR)
    reference, _ = load_model(REFERENCE)
    vocab = reference.config.vocab_size
    val = {corpus: TokenBin.open(TOKENS_DIR / corpus, "val", expected_vocab_size=vocab)
           for corpus in ("pretrain", "finetune")}

    metrics: dict = {"perf": {}}
    rows, samples = [], {}
    for name, (directory, weights) in MODELS.items():
        model, tokenizer = load_model(name)
        figures = {f"val_perplexity_{corpus}": round(perplexity(window_loss(
            model, bins, p.block_size, p.eval_windows, p.batch_size)), 4)
            for corpus, bins in val.items()}
        report = policy_report(model, reference, tokenizer, reward_model, reward_tokenizer,
                               gold, heldout, p.samples_per_prompt, p.completion_tokens,
                               p.temperature, shared.seed)
        figures.update({"reward_model_score": round(report["reward_model_score"], 4),
                        "gold_score": round(report["gold_score"], 4),
                        "kl_to_finetune": round(report["kl_to_reference"], 4),
                        "completion_length": round(report["completion_length"], 4),
                        "size_mb": round((directory / weights).stat().st_size / 1e6, 4)})
        prompt = tokenizer(p.sample.prompts[0], return_tensors="pt").input_ids
        tokens_per_s = round(generation_tokens_per_s(model, prompt, p.generate_tokens,
                                                     p.repeats), 1)
        metrics[name] = figures
        metrics["perf"][name] = {"generate_tokens_per_s": tokens_per_s}
        rows.append({"model": name, **figures, "generate_tokens_per_s": tokens_per_s})
        groups = sample_completions(model, tokenizer, p.sample.prompts, 1,
                                    p.sample.max_new_tokens, p.sample.temperature,
                                    p.sample.top_k, shared.seed, top_p=p.sample.top_p)
        samples[name] = [{"prompt": q, "completion": g[0].text}
                         for q, g in zip(p.sample.prompts, groups, strict=True)]
        print(f"{name}: {figures}")

    write_metrics("evaluate", metrics)
    write_json(PLOT_ROWS, rows)
    with atomic_dir(OUT_DIR) as tmp:
        write_json(tmp / "samples.json", samples)
        write_report(tmp, rows, samples)
    print(f"report card -> {OUT_DIR / 'report.md'}")


if __name__ == "__main__":
    run_main(main)

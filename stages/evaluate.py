"""evaluate: every model the pipeline made, on the same held-out data and prompts, in one
table (metrics/evaluate_models.json) with each model's samples; the report stage renders them."""

from llmpipe import layout
from llmpipe.data.tokens import TokenBin
from llmpipe.evaluation.cloze import CLOZE_FILE, build_cloze
from llmpipe.evaluation.harness import check_harness, run_harness
from llmpipe.evaluation.intervals import estimate, interval_metrics, item_values, paired_gain
from llmpipe.evaluation.params import EvaluateParams
from llmpipe.evaluation.scores import generation_tokens_per_s, token_byte_lengths, window_scores
from llmpipe.export.quantization import WEIGHTS_FILE, load_for_inference
from llmpipe.io import atomic_dir, rounded, write_json, write_jsonl, write_metrics
from llmpipe.model.loading import load_causal_lm, load_tokenizer, token_vocab_size
from llmpipe.params import load_stage_params
from llmpipe.rl.preferences import read_prompts
from llmpipe.rl.rlhf import load_judges, policy_report
from llmpipe.rl.sampling import Sampling, sample_completions
from llmpipe.runtime import visible_devices
from llmpipe.stage import run_main

REFERENCE = "finetune"  # the SFT policy: KL is measured against it


def load_model(name: str):
    directory = layout.MODEL_OUTPUTS[name]
    if name == "quantized":  # on the GPU if its method runs there, else on the CPU
        return load_for_inference(directory), load_tokenizer(directory)
    model, tokenizer = load_causal_lm(directory)
    return model.eval(), tokenizer


def weights_file(name: str):
    return layout.MODEL_OUTPUTS[name] / (
        WEIGHTS_FILE if name == "quantized" else "model.safetensors"
    )


def main() -> None:
    shared, p = load_stage_params(EvaluateParams)
    check_harness(p.harness_tasks)  # before minutes of measuring
    heldout = read_prompts(layout.PREFERENCES, "heldout")
    reference, reference_tokenizer = load_model(REFERENCE)
    judges = load_judges(layout.PREFERENCES, layout.REWARD_MODEL, reference)
    vocab = token_vocab_size(reference, reference_tokenizer)
    val = {
        corpus: TokenBin.open(layout.tokens(corpus), "val", expected_vocab_size=vocab)
        for corpus in layout.CORPORA
    }
    scored = Sampling(p.samples_per_prompt, p.completion_tokens, p.temperature, shared.seed)
    shown = Sampling(
        1,
        p.sample.max_new_tokens,
        p.sample.temperature,
        shared.seed,
        top_k=p.sample.top_k,
        top_p=p.sample.top_p,
    )

    # The offline harness task's items, from the validation documents of this run's split: no
    # stage trained on them, whatever the seed (llmpipe.evaluation.cloze).
    cloze = (
        build_cloze(val["finetune"], reference_tokenizer, shared.seed)
        if "llmpipe_cloze" in (p.harness_tasks or ())
        else []
    )
    figures, reports, samples, perf = {}, {}, {}, {}
    with atomic_dir(layout.EVALUATE_SAMPLES) as out:
        write_jsonl(out / CLOZE_FILE, cloze)
        for name in layout.MODEL_OUTPUTS:
            model, tokenizer = load_model(name)
            token_bytes = token_byte_lengths(tokenizer)
            scores = {
                corpus: window_scores(
                    model, bins, p.block_size, p.eval_windows, p.batch_size, token_bytes
                )
                for corpus, bins in val.items()
            }
            report = policy_report(model, tokenizer, heldout, scored, judges)
            harness = run_harness(
                model,
                tokenizer,
                p.harness_tasks,
                p.harness_limit,
                p.batch_size,
                shared.seed,
                out / CLOZE_FILE,
            )
            figures[name] = model_figures(scores, report, harness, weights_file(name))
            reports[name] = {"windows": scores, "prompts": report}
            prompt = tokenizer(p.sample.prompts[0], return_tensors="pt").input_ids
            # The int8 model may run on the CPU while the others use the GPU: every row says
            # where its figures come from.
            perf[name] = {
                "generate_tokens_per_s": generation_tokens_per_s(
                    model, prompt, p.generate_tokens, p.repeats
                ),
                "device": str(next(model.parameters()).device),
                "visible_devices": visible_devices(),
            }
            groups = sample_completions(
                model, tokenizer, p.sample.prompts, shown, judges.prompt_format
            )
            samples[name] = [
                {"prompt": q, "completion": g[0].text}
                for q, g in zip(p.sample.prompts, groups, strict=True)
            ]
            print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in figures[name].items()))
        write_json(out / "samples.json", samples)
        write_model_items(out / "items.json", reports)

    # Each model against the finetuned policy, paired over the same held-out prompts and
    # sampling seeds: the gold score's difference with its interval.
    for name, report in reports.items():
        if name != REFERENCE:
            figures[name].update(
                interval_metrics(
                    "gold_vs_finetune",
                    paired_gain(reports[REFERENCE]["prompts"], report["prompts"], "gold_score"),
                )
            )
    write_metrics("evaluate", {**figures, "perf": perf})
    write_json(
        layout.EVALUATE_MODELS,
        [rounded({"model": name, **figures[name], **perf[name]}) for name in figures],
    )
    print(f"-> {layout.EVALUATE_MODELS}, {layout.EVALUATE_SAMPLES}")


def model_figures(scores: dict, report: dict, harness: dict, weights) -> dict:
    """One model's row: perplexity and bits per byte on each corpus (with the perplexity's
    95% interval over windows), its held-out completions' scores (with standard errors over
    prompts), and the harness's accuracies."""
    figures = {}
    for corpus, score in scores.items():
        figures.update(score.perplexity_metrics(f"val_perplexity_{corpus}"))
        figures[f"val_bits_per_byte_{corpus}"] = score.bits_per_byte
    for key, figure in (
        ("reward_model_score", "reward_model_score"),
        ("gold_score", "gold_score"),
        ("kl_to_reference", "kl_to_finetune"),
    ):
        figures[figure] = report[key]
        figures[f"{figure}_se"] = estimate(item_values(report, key)).se
    figures.update(
        {
            "completion_length": report["completion_length"],
            "distinct_2": report["distinct_2"],
            "repeated_3gram_share": report["repeated_3gram_share"],
            "completion_loss_under_finetune": report["reference_loss"],  # fluency
            "size_mb": weights.stat().st_size / 1e6,
        }
    )
    figures.update(
        {
            f"{task}_{key}": value
            for task, results in harness.items()
            for key, value in results.items()
        }
    )
    return figures


def write_model_items(path, reports: dict) -> None:
    """Per model, what its figures are computed from: the loss of each validation window of
    each corpus, and each held-out prompt's scores."""
    write_json(
        path,
        rounded(
            {
                name: {
                    "windows": {
                        corpus: score.window_losses for corpus, score in r["windows"].items()
                    },
                    "prompts": r["prompts"]["items"],
                }
                for name, r in reports.items()
            }
        ),
    )


if __name__ == "__main__":
    run_main(main)

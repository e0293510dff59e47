"""Training-step throughput: llmpipe's GPT against transformers' GPT2LMHeadModel.

    python bench/train_step.py [--steps 20] [--rounds 3] [--no-compile]

Same config, batch, data and optimizer (fused AdamW, as the pretrain stage uses) for both;
the two models alternate in one process (absolute times drift on a shared 2-core machine,
ratios do not), eager and under torch.compile (the pretrain stage's `compile` param).
Reports tokens/s, the ratio to Hugging Face in eager fp32, and achieved FLOP/s
(6N + 12LHQT per token) against the machine's measured fp32 matmul peak. A second table times
the tanh GELU alone: ATen's kernel against the sigmoid form that llmpipe uses under compile.
"""

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from llmpipe.model.gpt import GPT, GPTConfig, gelu_tanh, measure_matmul_peak_flops

CONFIGS = [  # name, n_layer, n_head, n_embd, block_size, batch_size
    ("default 4x128, T=128, B=16", 4, 4, 128, 128, 16),
    ("6x256, T=256, B=8", 6, 8, 256, 256, 8),
]
VOCAB = 4096


def hf_step_fn(model):
    def step(x, y):
        return model(input_ids=x, labels=y).loss

    return step


def ours_step_fn(model):
    def step(x, y):
        return model(x, y)[1]

    return step


def make_models(n_layer, n_head, n_embd, block):
    torch.manual_seed(0)
    ours = GPT(
        GPTConfig(vocab_size=VOCAB, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd)
    )
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_positions=block,
            n_layer=n_layer,
            n_head=n_head,
            n_embd=n_embd,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    return ours, hf


def time_steps(step, model, batches, dtype):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    model.train()
    x, y = batches[0]
    with autocast:
        step(x, y).backward()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for x, y in batches:
        with autocast:
            loss = step(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def gelu_table(dtypes: list[str], rounds: int) -> None:
    """Forward + backward of the MLP's activation at the 6x256 size (B=8, T=256, 4C=1024)."""
    x32 = torch.randn(8, 256, 1024)

    def aten_gelu(x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")

    forms = [
        ("ATen F.gelu(tanh), eager", aten_gelu),
        ("ATen F.gelu(tanh), compiled", torch.compile(aten_gelu)),
        ("gelu_tanh (sigmoid form), compiled", torch.compile(gelu_tanh)),
    ]
    print("\n| GELU form | dtype | fwd+bwd ms |")
    print("|---|---|---:|")
    for dtype in dtypes:
        x = x32.to(torch.bfloat16 if dtype == "bf16" else torch.float32).requires_grad_()
        grad = torch.ones_like(x)
        for label, form in forms:
            best = math.inf
            for _ in range(rounds * 5):
                start = time.perf_counter()
                torch.autograd.grad(form(x), x, grad)  # no .grad to accumulate into
                best = min(best, time.perf_counter() - start)
            print(f"| {label} | {dtype} | {best * 1e3:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="eager rows only (compiling the models takes a few minutes)",
    )
    args = parser.parse_args()
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    dtypes = ["fp32", "bf16"] if bf16 else ["fp32"]
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    # The machine's speed drifts by 20-40% over minutes, so each timing is set against a peak
    # measured right before and after it (the better of the two): a row's "% of fp32 peak" is
    # the median of those ratios over the rounds, while its tokens/s and GFLOP/s are the best
    # round's. The header gives the range of the peak measurements over the run.
    peaks = []
    rows = []
    for name, n_layer, n_head, n_embd, block, batch in CONFIGS:
        ours, hf = make_models(n_layer, n_head, n_embd, block)
        g = torch.Generator().manual_seed(0)
        inputs = [torch.randint(VOCAB, (batch, block), generator=g) for _ in range(args.steps)]
        batches = [(x, torch.roll(x, -1, 1)) for x in inputs]
        steps = {("HF", "eager"): hf_step_fn(hf), ("llmpipe", "eager"): ours_step_fn(ours)}
        if "compile" in modes:
            steps[("HF", "compile")] = hf_step_fn(torch.compile(hf))
            steps[("llmpipe", "compile")] = ours_step_fn(torch.compile(ours))
        models = {"HF": hf, "llmpipe": ours}
        tokens = args.steps * batch * block
        flops_per_token = ours.flops_per_token()
        best, peak_fractions = {}, {}
        for _ in range(args.rounds):
            for mode in modes:
                for dtype in dtypes:
                    for label in models:
                        before = measure_matmul_peak_flops(torch.float32)
                        seconds = time_steps(steps[(label, mode)], models[label], batches, dtype)
                        adjacent_peak = max(before, measure_matmul_peak_flops(torch.float32))
                        peaks.append(adjacent_peak)
                        key = (label, dtype, mode)
                        best[key] = min(best.get(key, math.inf), seconds)
                        peak_fractions.setdefault(key, []).append(
                            tokens / seconds * flops_per_token / adjacent_peak
                        )
        base = tokens / best[("HF", "fp32", "eager")]
        for key, seconds in best.items():
            tps = tokens / seconds
            rows.append(
                (
                    name,
                    *key,
                    tps,
                    tps / base,
                    tps * flops_per_token,
                    statistics.median(peak_fractions[key]),
                )
            )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 matmul peak "
        f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f} GFLOP/s over the run, "
        f"bf16 {'yes' if bf16 else 'no'}"
    )
    print(
        "| config | model | dtype | mode | tokens/s | vs HF fp32 eager | GFLOP/s | % of fp32 peak |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|")
    for name, label, dtype, mode, tps, ratio, flops, peak_fraction in rows:
        print(
            f"| {name} | {label} | {dtype} | {mode} | {tps:,.0f} | {ratio:.2f}x | "
            f"{flops / 1e9:.0f} | {100 * peak_fraction:.0f}% |"
        )
    if "compile" in modes:
        gelu_table(dtypes, args.rounds)


if __name__ == "__main__":
    main()

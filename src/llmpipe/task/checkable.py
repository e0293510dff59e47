"""A task whose answers a program can check: the pipeline's branch for RL with verifiable rewards.

Problems are generated from a seed: `add` (two numbers of `digits` digits, e.g. "7 5 + 4 8 =" ->
" 1 2 3"), `add_reversed` (the same sum written least significant digit first, " 3 2 1": the
order a model computes it in, carries flowing forward, which small transformers learn from far
fewer examples; Lee et al. 2023, "Teaching Arithmetic to Small Transformers") or `reverse` (a
digit string, e.g. "reverse 3 1 4 =" -> " 4 1 3"). Digits are written with spaces so that a
tokenizer that splits digits (byte-level BPEs: GPT-2's, the embedded one) sees one token per
digit. Train and test problems are disjoint: each possible problem falls on one side by a hash
of its text (for `add`, of the unordered pair: a + b and b + a fall on the same side), before
any is drawn. A completion is right when its text up to
the end of text (or a newline) is the answer, spaces aside (`exact_match`).

Measured on held-out problems: teacher-forced token accuracy (the answer's tokens and the
end-of-text token predicted from the true prefix), free-running exact match (greedy decoding,
the model feeding itself) and pass@k (the chance that at least one of k samples at temperature 1
is right, estimated from n >= k samples per problem with Chen et al. 2021's unbiased estimator:
more samples than k make it less noisy). Teacher-forced accuracy is high long before
free-running answers are right: an error early in an answer changes every token after it
(exposure bias). The report card shows what the embedded default measured, whatever it is.

At the GPU scale the same branch runs on GSM8K (`gsm8k`: grade-school word problems from a
source, the dataset's own train and test splits; the model learns the worked solution, and a
completion is right when its final number, after "####" or else the last one it writes, is
the answer), usually with an instruct model and its chat template (`chat`, llmpipe.data.chat).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import torch

from llmpipe import layout
from llmpipe.data.chat import PLAIN, TEMPLATE_KWARGS, PromptFormat, message_text
from llmpipe.errors import DataError
from llmpipe.io import atomic_dir, read_jsonl, write_json, write_jsonl

GENERATED_KINDS = ("add", "add_reversed", "reverse")  # all_problems; gsm8k comes from a source


@dataclass(frozen=True)
class Problem:
    prompt: str
    # what the checker compares: digits separated by spaces, with a leading space (" 1 2 3"),
    # or gsm8k's final number
    answer: str
    solution: str | None = None  # what SFT teaches when it is more than the answer (gsm8k)

    @property
    def target(self) -> str:
        return self.answer if self.solution is None else self.solution

    def as_dict(self) -> dict:
        row = {"prompt": self.prompt, "answer": self.answer}
        return row if self.solution is None else {**row, "solution": self.solution}


def _spaced(digits: str) -> str:
    return " ".join(digits)


def all_problems(kind: str, digits: int) -> list[Problem]:
    if kind in ("add", "add_reversed"):
        numbers = range(10 ** (digits - 1) if digits > 1 else 0, 10**digits)
        order = -1 if kind == "add_reversed" else 1  # the sum's digits, last first
        return [
            Problem(f"{_spaced(str(a))} + {_spaced(str(b))} =", " " + _spaced(str(a + b)[::order]))
            for a, b in itertools.product(numbers, numbers)
        ]
    if kind == "reverse":
        strings = ("".join(p) for p in itertools.product("0123456789", repeat=digits))
        return [Problem(f"reverse {_spaced(s)} =", " " + _spaced(s[::-1])) for s in strings]
    raise ValueError(f"unknown task kind {kind!r} (one of {', '.join(GENERATED_KINDS)})")


def _side_key(problem: Problem) -> str:
    """What decides a problem's side: its text, but for `add` the unordered pair, so that
    a + b and b + a are both train or both test."""
    if " + " in problem.prompt:
        return " + ".join(sorted(problem.prompt.removesuffix(" =").split(" + ")))
    return problem.prompt


def _is_test(problem: Problem, seed: int, test_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{_side_key(problem)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction


def make_problems(
    kind: str, digits: int, train: int, test: int, seed: int, test_fraction: float = 0.2
) -> dict[str, list[Problem]]:
    """`train` and `test` problems, disjoint, the same for the same arguments."""
    pool = all_problems(kind, digits)
    sides: dict[str, list[Problem]] = {"train": [], "test": []}
    for problem in pool:
        sides["test" if _is_test(problem, seed, test_fraction) else "train"].append(problem)
    rng = random.Random(seed)
    out = {}
    for split, count in (("train", train), ("test", test)):
        if count > len(sides[split]):
            raise ValueError(
                f"{split}: {count} problems asked, {len(sides[split])} possible "
                f"({kind}, {digits} digits)"
            )
        out[split] = rng.sample(sides[split], count)
    return out


# --- GSM8K ---------------------------------------------------------------------------------

GSM8K_MARK = "####"  # GSM8K's solutions end "#### <final number>"
GSM8K_PROMPT = "Question: {question}\nAnswer:"  # the solution follows after a space
# A number: a sign only where no word or number precedes it ("3-4" is not -4), thousands in
# groups of three ("1,200"; "1,2,3" is three numbers), a fraction.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")


def final_number(text: str) -> str | None:
    """The number after the last "####", else the last number of the text, written plainly
    ("1,200.00" -> "1200", ".5" -> "0.5"); None when there is none."""
    marked = text.rsplit(GSM8K_MARK, 1)
    numbers = _NUMBER.findall(marked[1] if len(marked) == 2 else text)
    if not numbers:
        return None
    value = Decimal((numbers[0] if len(marked) == 2 else numbers[-1]).replace(",", ""))
    return format(value.normalize(), "f") if value else "0"


def _gsm8k_split(source: str, split: str) -> list[Problem]:
    from llmpipe.data.corpus import load_records, require_columns

    where = (
        f"file:{Path(source.removeprefix('file:')) / f'{split}.jsonl'}"
        if source.startswith("file:")
        else source
    )
    records, columns = load_records(where, split)
    require_columns(
        columns,
        ("question", "answer"),
        where,
        'GSM8K rows have a question and an answer ending "#### <number>"',
    )
    problems = []
    for i, r in enumerate(records):
        answer = final_number(r["answer"]) if GSM8K_MARK in r["answer"] else None
        if answer is None:
            raise DataError(f'{where}: row {i} has no "{GSM8K_MARK} <number>" in its answer')
        problems.append(
            Problem(GSM8K_PROMPT.format(question=r["question"]), answer, " " + r["answer"])
        )
    return problems


def gsm8k_problems(source: str, train: int, test: int, seed: int) -> dict[str, list[Problem]]:
    """`train` problems drawn (seeded) from the source's train split, the first `test` of its
    test split; a test question also in the train split is left out."""
    pool = {split: _gsm8k_split(source, split) for split in ("train", "test")}
    trained = {q.prompt for q in pool["train"]}
    pool["test"] = [q for q in pool["test"] if q.prompt not in trained]
    for split, count in (("train", train), ("test", test)):
        if count > len(pool[split]):
            raise DataError(
                f"{source}: {count} {split} problems asked "
                f"(task_sft.{split}_problems), {len(pool[split])} there"
            )
    return {"train": random.Random(seed).sample(pool["train"], train), "test": pool["test"][:test]}


def load_problems(
    kind: str, source: str | None, digits: int, train: int, test: int, seed: int
) -> dict[str, list[Problem]]:
    """The branch's problems, whatever their kind."""
    if kind == "gsm8k":
        if source is None:
            raise DataError(
                "task_sft.source: missing: gsm8k reads its problems from a source "
                "(hf:openai/gsm8k:main, or file:<dir> with train.jsonl, test.jsonl)"
            )
        return gsm8k_problems(source, train, test, seed)
    return make_problems(kind, digits, train, test, seed)


# --- checking answers --------------------------------------------------------------------------


def parse_answer(completion: str) -> str | None:
    """The digits a completion answers with, or None when it is no answer (empty, or anything
    but digits and spaces before the end of text or a newline)."""
    line = completion.split("\n", 1)[0]
    if not re.fullmatch(r"[ \d]*\d[ \d]*", line):
        return None
    return line.replace(" ", "")


def parsed(completion: str, kind: str) -> str | None:
    return final_number(completion) if kind == "gsm8k" else parse_answer(completion)


def exact_match(completion: str, answer: str, kind: str) -> bool:
    return parsed(completion, kind) == answer.replace(" ", "")


def random_reward(probability: float, seed: int):
    """A reward that ignores the completion: 1 with `probability`, else 0, from a seeded draw
    (the random-reward control: a gain under it is the training's, not the checker's)."""
    rng = random.Random(seed)

    def random_reward(prompts, completions, **kwargs) -> list[float]:
        return [float(rng.random() < probability) for _ in completions]

    return random_reward


def sampled_pass_rate(model, tokenizer, problems, kind, seed, prompt_format, n: int = 4) -> float:
    """The share of `n` samples a problem (temperature 1) that are right."""
    room = answer_tokens(tokenizer, problems, prompt_format)
    right = sampled_right(model, tokenizer, problems, kind, n, room, seed, prompt_format)
    return sum(map(sum, right)) / (n * len(problems))


def exact_match_reward(prompts, completions, answer, kind, **kwargs) -> list[float]:
    """The checker as a reward function (TRL's signature; `answer` and `kind` are the
    dataset's columns, completions text or, under a chat format, messages): 1 for the exact
    answer, else 0."""
    return [
        float(exact_match(message_text(c), a, k))
        for c, a, k in zip(completions, answer, kind, strict=True)
    ]


# --- measuring a model on problems -----------------------------------------------------------


def _encode(
    tokenizer, problems: Sequence[Problem], prompt_format: PromptFormat
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids + end of text) per problem; under a chat format the target is
    the assistant turn, up to its end of turn (the tokenizer's EOS)."""
    encoded = []
    for p in problems:
        prompt = prompt_format.prompt_ids(tokenizer, p.prompt)
        if prompt_format.chat:
            whole = prompt_format.scored_ids(tokenizer, p.prompt, p.target)
            if whole[: len(prompt)] != prompt:
                raise DataError(
                    f"{tokenizer.name_or_path}: its chat template renders a prompt "
                    "differently alone and before an answer: set task_sft.chat "
                    "false"
                )
            target = whole[len(prompt) :]
            if tokenizer.eos_token_id in target:  # what greedy decoding stops at
                target = target[: target.index(tokenizer.eos_token_id) + 1]
            encoded.append((prompt, target))
        else:
            encoded.append(
                (
                    prompt,
                    tokenizer(p.target, add_special_tokens=False).input_ids
                    + [tokenizer.eos_token_id],
                )
            )
    return encoded


@torch.no_grad()
def teacher_forced_accuracy(
    model, tokenizer, problems: Sequence[Problem], prompt_format: PromptFormat = PLAIN
) -> tuple[float, float]:
    """(the share of answer tokens, end of text included, that are the model's top prediction
    given the true prefix; the share of answers with every token so). Greedy decoding follows
    the top prediction, so the second is greedy decoding's exact match, give or take the
    checker's leniency (spaces, a newline ending the answer)."""
    model.eval()
    device = next(model.parameters()).device
    right = total = whole = 0
    for prompt, answer in _encode(tokenizer, problems, prompt_format):
        ids = torch.tensor([prompt + answer], device=device)
        correct = model(ids).logits[0, len(prompt) - 1 : -1].argmax(-1) == ids[0, len(prompt) :]
        right += correct.sum().item()
        total += len(answer)
        whole += bool(correct.all())
    return right / total, whole / len(problems)


@torch.no_grad()
def completions(
    model,
    tokenizer,
    problems: Sequence[Problem],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    prompt_format: PromptFormat = PLAIN,
) -> list[list[str]]:
    """`n` completions per problem: greedy when temperature is 0, else sampled."""
    from llmpipe.rl.sampling import Sampling, sample_completions

    groups = sample_completions(
        model,
        tokenizer,
        [p.prompt for p in problems],
        Sampling(n, max_new_tokens, temperature, seed),
        prompt_format,
    )
    return [[c.text for c in group] for group in groups]


def answer_tokens(tokenizer, problems: Sequence[Problem], prompt_format: PromptFormat) -> int:
    """Room for the longest target and its end of text, plus one token."""
    return max(len(answer) for _, answer in _encode(tokenizer, problems, prompt_format)) + 1


def sampled_right(
    model,
    tokenizer,
    problems: Sequence[Problem],
    kind: str,
    n: int,
    room: int,
    seed: int,
    prompt_format: PromptFormat,
) -> list[list[bool]]:
    """Per problem, whether each of `n` samples at temperature 1 is right."""
    sampled = completions(model, tokenizer, problems, n, 1.0, room, seed, prompt_format)
    return [
        [exact_match(c, p.answer, kind) for c in group]
        for group, p in zip(sampled, problems, strict=True)
    ]


def pass_at_k(n: int, right: int, k: int) -> float:
    """The chance that k of a problem's n samples, `right` of them right, drawn without
    replacement include a right one: 1 - C(n - right, k) / C(n, k) (Chen et al. 2021),
    as a product, which stays exact for large n."""
    if n - right < k:
        return 1.0
    return 1.0 - math.prod(1 - k / i for i in range(n - right + 1, n + 1))


def task_report(
    model,
    tokenizer,
    problems: Sequence[Problem],
    kind: str,
    k: int,
    n: int,
    seed: int,
    prompt_format: PromptFormat = PLAIN,
) -> dict:
    """Teacher-forced token accuracy, free-running exact match (greedy), pass@1 and pass@k
    (from n samples at temperature 1), and a few greedy answers to read."""
    room = answer_tokens(tokenizer, problems, prompt_format)
    greedy = [
        g[0] for g in completions(model, tokenizer, problems, 1, 0.0, room, seed, prompt_format)
    ]
    right = sampled_right(model, tokenizer, problems, kind, n, room, seed, prompt_format)
    token_accuracy, sequence_accuracy = teacher_forced_accuracy(
        model, tokenizer, problems, prompt_format
    )
    greedy_right = [exact_match(c, p.answer, kind) for c, p in zip(greedy, problems, strict=True)]
    return {
        "teacher_forced_token_accuracy": token_accuracy,
        "teacher_forced_sequence_accuracy": sequence_accuracy,
        "exact_match": sum(greedy_right) / len(problems),
        "pass_at_1": sum(sum(r) for r in right) / (n * len(problems)),
        f"pass_at_{k}": sum(pass_at_k(n, sum(r), k) for r in right) / len(problems),
        "pass_k": k,
        "pass_samples": n,
        "malformed_share": sum(parsed(c, kind) is None for c in greedy) / len(problems),
        "samples": [
            {"prompt": p.prompt, "answer": p.answer, "completion": c}
            for p, c in zip(problems[:4], greedy[:4], strict=True)
        ],
        # per problem: the items the intervals are computed from
        "items": [
            {
                "prompt": p.prompt,
                "exact_match": float(g),
                "pass_at_1": sum(r) / n,
                f"pass_at_{k}": pass_at_k(n, sum(r), k),
            }
            for p, g, r in zip(problems, greedy_right, right, strict=True)
        ],
    }


def chance_exact_match(kind: str, digits: int) -> float | None:
    """A uniform guess among the possible answers: the floor beside exact match (None for
    gsm8k, whose answers are any number)."""
    if kind == "gsm8k":
        return None
    if kind == "reverse":
        return 1 / 10**digits
    smallest = 10 ** (digits - 1) if digits > 1 else 0
    return 1 / (2 * (10**digits - 1) - 2 * smallest + 1)  # the possible sums


# --- the branch's files and training -----------------------------------------------------------

REPORT_FILE = "task_report.json"  # beside a task model: its test figures (the RL stages' before)


@dataclass(frozen=True)
class TaskSet:
    """The task directory: problems per split, their kind (which checker) and the prompt
    format the task stages all use."""

    problems: dict[str, list[Problem]]
    kind: str
    digits: int
    prompt_format: PromptFormat

    def write(self, directory: Path) -> None:
        with atomic_dir(directory) as tmp:
            for split, rows in self.problems.items():
                write_jsonl(tmp / f"{split}.jsonl", (p.as_dict() for p in rows))
            write_json(tmp / "task.json", {"kind": self.kind, "digits": self.digits})
            self.prompt_format.write(tmp)

    @classmethod
    def read(cls, directory: Path) -> TaskSet:
        task = json.loads((directory / "task.json").read_text())
        problems = {
            split: [Problem(**row) for row in read_jsonl(directory / f"{split}.jsonl")]
            for split in ("train", "test")
        }
        return cls(problems, task["kind"], task["digits"], PromptFormat.read(directory))

    def rl_rows(self) -> list[dict]:
        """The train problems as RL prompts, with the columns the reward reads."""
        return [
            {"prompt": q.prompt, "answer": q.answer, "kind": self.kind}
            for q in self.problems["train"]
        ]


def run_sft(p, problems: Sequence[Problem], prompt_format: PromptFormat, seed: int, live_dir: Path):
    """TRL's SFTTrainer on prompt -> answer pairs (the loss on the answer and its end of text
    only), from `p.base`, its weights in float32 (bf16 on CUDA is the Trainer's autocast);
    returns (model, wall seconds)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from llmpipe.model.loading import load_causal_lm
    from llmpipe.runtime import checkpointing_args, fp32_master_weights, runtime_args
    from llmpipe.train.callbacks import TrainerCurves

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(p.base)
    fp32_master_weights(model)
    work_dir = tempfile.mkdtemp(prefix="llmpipe-task-sft-")
    args = SFTConfig(
        output_dir=work_dir,
        max_steps=p.max_steps,
        per_device_train_batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        warmup_steps=p.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=p.weight_decay,
        completion_only_loss=True,
        packing=False,
        **checkpointing_args(p.gradient_checkpointing),
        logging_steps=10,
        save_strategy="no",
        **runtime_args(seed),
    )
    extra = {"chat_template_kwargs": TEMPLATE_KWARGS} if prompt_format.chat else {}
    dataset = Dataset.from_list(
        [
            {
                "prompt": prompt_format.trl_prompt(q.prompt),
                "completion": prompt_format.trl_completion(q.target),
                **extra,
            }
            for q in problems
        ]
    )
    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[TrainerCurves(live_dir)],
        )
        trainer.train()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    return trainer.model.eval(), time.perf_counter() - started


def save_task_model(directory: Path, model, tokenizer, report: dict) -> None:
    with atomic_dir(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT_FILE, report)


def read_task_report(directory: Path) -> dict:
    return json.loads((directory / REPORT_FILE).read_text())


@dataclass
class TaskMeasure:
    """A policy on the test problems: task_report's figures, with pass@k at task_sft's k and
    n."""

    task: TaskSet
    tokenizer: object
    k: int
    n: int
    seed: int

    def report(self, model, first: int | None = None) -> dict:
        return task_report(
            model,
            self.tokenizer,
            self.task.problems["test"][:first],
            self.task.kind,
            self.k,
            self.n,
            self.seed,
            self.task.prompt_format,
        )


CONTROL_PROBLEMS = 200  # train problems the random reward's probability is measured on


def task_run(seed: int, reward: str = "checker"):
    """The task pair's RL run (llmpipe.rl.harness): from task_sft's model on the train
    problems, rewarded by the exact-match checker (or, `reward: random`, by the random-reward
    control at the SFT model's sampled pass rate on the train problems), measured on the test
    problems against task_sft's report of the same model."""
    from llmpipe.model.loading import load_causal_lm, load_tokenizer
    from llmpipe.rl.harness import RlRun

    task = TaskSet.read(layout.TASK_PROBLEMS)
    before = read_task_report(layout.TASK_SFT_MODEL)
    tokenizer = load_tokenizer(layout.TASK_SFT_MODEL)
    rewards, control = [(exact_match_reward, 1.0)], {}
    if reward == "random":
        rate = sampled_pass_rate(
            load_causal_lm(layout.TASK_SFT_MODEL)[0],
            tokenizer,
            task.problems["train"][:CONTROL_PROBLEMS],
            task.kind,
            seed,
            task.prompt_format,
        )
        rewards, control = [(random_reward(rate, seed), 1.0)], {"random_reward_probability": rate}
    return RlRun(
        policy_dir=layout.TASK_SFT_MODEL,
        rows=task.rl_rows(),
        prompt_format=task.prompt_format,
        rewards=rewards,
        measure=TaskMeasure(task, tokenizer, before["pass_k"], before["pass_samples"], seed),
        before=before,
        gains={"exact_match": "exact_match_gain", "pass_at_1": "pass_at_1_gain"},
        load_reference=lambda: load_causal_lm(layout.TASK_SFT_MODEL)[0],
        # the metrics say which reward trained the policy
        verdicts=lambda before, after, metrics: {"reward": reward, **control},
    )

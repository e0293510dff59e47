"""The checkable task (llmpipe.task.checkable): its problems and its checker."""

import json

import pytest
import torch

from conftest import save_micro_instruct
from llmpipe.data.chat import PromptFormat
from llmpipe.errors import DataError
from llmpipe.task.checkable import (
    exact_match,
    exact_match_reward,
    final_number,
    load_problems,
    make_problems,
    parse_answer,
)


def test_train_and_test_problems_are_disjoint_and_the_same_for_the_same_seed():
    for kind, digits in (("add", 2), ("add_reversed", 2), ("reverse", 3)):
        problems = make_problems(kind, digits, 500, 100, seed=7)
        again = make_problems(kind, digits, 500, 100, seed=7)
        assert problems == again
        train, test = ({p.prompt for p in problems[s]} for s in ("train", "test"))
        assert len(train) == 500 and len(test) == 100 and not train & test
        # a bigger draw keeps the sides: a problem never changes side with the counts
        bigger = make_problems(kind, digits, 800, 150, seed=7)
        assert not {p.prompt for p in bigger["train"]} & test
    assert make_problems("add", 2, 500, 100, seed=8) != make_problems("add", 2, 500, 100, seed=7)


def test_problems_are_right():
    for p in make_problems("add", 2, 50, 10, seed=0)["train"]:
        a, b = (int(side.replace(" ", "")) for side in p.prompt.removesuffix(" =").split(" + "))
        assert p.answer == " " + " ".join(str(a + b))
    for p in make_problems("add_reversed", 2, 500, 10, seed=0)["train"]:
        a, b = (int(side.replace(" ", "")) for side in p.prompt.removesuffix(" =").split(" + "))
        assert int(p.answer.replace(" ", "")[::-1]) == a + b  # least significant digit first
        assert exact_match(p.answer, p.answer, "add_reversed")  # the checker reads it back
        if a + b >= 100 and (a + b) % 10 == 0:  # a trailing zero leads: "0 2 1" is 120
            assert p.answer.startswith(" 0 ")
    for p in make_problems("reverse", 3, 50, 10, seed=0)["train"]:
        digits = p.prompt.removeprefix("reverse ").removesuffix(" =").split()
        assert p.answer.split() == digits[::-1]


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="test: 5000 problems asked"):
        make_problems("reverse", 2, 10, 5000, seed=0)


def test_the_checker_parses_right_wrong_and_malformed_answers():
    assert exact_match(" 1 2 3", " 1 2 3", "add")
    assert exact_match(" 1 2 3\nmore text", " 1 2 3", "add")  # a newline ends the answer
    assert exact_match("123", " 1 2 3", "add")  # spaces aside
    assert not exact_match(" 1 2 4", " 1 2 3", "add")
    assert not exact_match(" 1 2", " 1 2 3", "add")
    assert not exact_match(" 1 2 3 4", " 1 2 3", "add")
    for malformed in ("", " ", " 1 2 x", "the answer is 123", " -1 2 3", "1.23"):
        assert parse_answer(malformed) is None and not exact_match(malformed, " 1 2 3", "add")
    assert exact_match_reward(
        ["q"] * 3, [" 4 2", " 4 3", "x"], answer=[" 4 2"] * 3, kind=["add"] * 3
    ) == [1.0, 0.0, 0.0]


def test_gsm8k_answers_are_the_final_number():
    assert final_number("3 + 4 = 7 apples.\n#### 7") == "7"
    assert final_number("#### 1,200") == "1200"
    assert final_number("Half of 10 is 5, so the answer is 5.00.") == "5"
    assert final_number("She owes -3 dollars, not 4: #### -3") == "-3"
    assert final_number("no number at all") is None and final_number("#### none") is None
    assert final_number("children aged 3-4") == "4"  # a range, not minus four
    assert final_number("1,2,3") == "3" and final_number("it costs .5") == "0.5"
    assert final_number("#### 2.50") == "2.5" and final_number("#### 0.0") == "0"
    assert exact_match("so it is 12 + 6 = 18\n#### 18", "18", "gsm8k")
    assert not exact_match("so it is 12 + 6 = 19", "18", "gsm8k")
    assert exact_match_reward(
        ["q"] * 2,
        [[{"role": "assistant", "content": "#### 18"}], "17"],
        answer=["18"] * 2,
        kind=["gsm8k"] * 2,
    ) == [1.0, 0.0]


def write_gsm8k(directory, train: int, test: int) -> str:
    """A GSM8K stand-in: file:<dir> with train.jsonl and test.jsonl."""
    directory.mkdir(exist_ok=True)
    rows = {
        "train": [
            {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(train)
        ],
        "test": [{"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"} for i in range(test)],
    }
    rows["test"].insert(0, rows["train"][0])  # a test question the train split also has
    for split, split_rows in rows.items():
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return f"file:{directory}"


def test_gsm8k_problems_from_a_source_are_disjoint_and_seeded(tmp_path):
    source = write_gsm8k(tmp_path / "gsm8k", train=20, test=5)
    problems = load_problems("gsm8k", source, 0, 8, 5, seed=3)
    assert problems == load_problems("gsm8k", source, 0, 8, 5, seed=3)
    assert problems != load_problems("gsm8k", source, 0, 8, 5, seed=4)
    assert not {q.prompt for q in problems["train"]} & {q.prompt for q in problems["test"]}
    first = problems["test"][0]
    assert (first.prompt, first.answer) == ("Question: What is 0 + 2?\nAnswer:", "2")
    assert first.target == " #### 2"  # the duplicate was left out
    assert problems["train"][0].target.endswith(f"#### {problems['train'][0].answer}")
    with pytest.raises(DataError, match=r"6 test problems asked \(task_sft\.test_problems\), 5"):
        load_problems("gsm8k", source, 0, 8, 6, seed=3)
    with pytest.raises(DataError, match=r"task_sft\.source: missing"):
        load_problems("gsm8k", None, 0, 8, 5, seed=3)
    (tmp_path / "gsm8k/test.jsonl").write_text('{"question": "q", "answer": "7"}\n')
    with pytest.raises(DataError, match=r"test\.jsonl: row 0 has no \"####"):
        load_problems("gsm8k", source, 0, 8, 1, seed=3)


def test_pass_at_k_is_chen_et_al_s_unbiased_estimator():
    from math import comb

    from llmpipe.task.checkable import pass_at_k

    for n, k in ((8, 8), (16, 8), (20, 5), (3, 2)):
        for right in range(n + 1):
            expected = 1 - comb(n - right, k) / comb(n, k)
            assert pass_at_k(n, right, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0  # n = k: any right
    assert pass_at_k(16, 1, 8) == pytest.approx(0.5)  # half of the 8-subsets hold the right one
    assert pass_at_k(16, 1, 1) == pytest.approx(1 / 16)  # pass@1: the share right


def test_the_task_on_an_instruct_model_through_its_chat_template(tmp_path):
    from llmpipe.model.loading import load_causal_lm
    from llmpipe.task.checkable import _encode, run_sft, task_report
    from llmpipe.task.params import TaskSftParams

    instruct, _ = save_micro_instruct(tmp_path / "instruct", "llama")
    instruct.to(torch.bfloat16).save_pretrained(tmp_path / "instruct")  # as Llama 3.2 ships
    model, tokenizer = load_causal_lm(tmp_path / "instruct")
    assert next(model.parameters()).dtype == torch.bfloat16
    chat = PromptFormat(chat=True)
    problems = load_problems("gsm8k", write_gsm8k(tmp_path / "gsm8k", 20, 4), 0, 16, 4, seed=0)
    prompt, target = _encode(tokenizer, problems["test"][:1], chat)[0]
    assert tokenizer.decode(prompt).endswith("assistant\n")
    assert target[-1] == tokenizer.eos_token_id  # the turn ends with the model's end of turn
    p = TaskSftParams(
        base=str(tmp_path / "instruct"),
        kind="gsm8k",
        source=None,
        chat=True,
        digits=1,
        train_problems=16,
        test_problems=4,
        pass_k=2,
        pass_samples=3,
        max_steps=3,
        batch_size=4,
        learning_rate=1e-3,
        warmup_steps=0,
        weight_decay=0.0,
        gradient_checkpointing=True,
    )
    trained, _ = run_sft(p, problems["train"], chat, 0, tmp_path / "live")
    # SFT recomputed the Llama blocks' activations (the flag transformers sets on them)
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in trained.modules())
    # and trained float32 master weights of the bf16 checkpoint
    assert {param.dtype for param in trained.parameters()} == {torch.float32}
    report = task_report(trained, tokenizer, problems["test"], "gsm8k", 2, 3, 0, chat)
    assert 0 <= report["teacher_forced_token_accuracy"] <= 1
    assert report["pass_samples"] == 3 and 0 <= report["pass_at_2"] <= 1
    assert report["samples"][0]["prompt"] == problems["test"][0].prompt


def test_the_random_reward_ignores_the_answer_and_pays_at_its_probability():
    from llmpipe.task.checkable import random_reward

    reward = random_reward(0.3, seed=5)
    problems = make_problems("add", 2, 2000, 10, seed=0)["train"]
    right = reward([q.prompt for q in problems], [q.answer for q in problems])  # every answer right
    wrong = reward([q.prompt for q in problems], [" 0" for _ in problems])  # every answer wrong
    for paid in (right, wrong):
        assert set(paid) == {0.0, 1.0}
        assert abs(sum(paid) / len(paid) - 0.3) < 4 * (0.3 * 0.7 / len(paid)) ** 0.5
    assert random_reward(0.3, seed=5)(["q"] * 50, ["a"] * 50) == right[:50]  # seeded
    assert exact_match_reward(["q"], [" 1 2"], [" 1 2"], ["add"]) == [1.0]  # the checker's


def _task_items(before, after):
    return [
        {
            "prompt": f"{i} + {i} =",
            "before_exact_match": b,
            "before_pass_at_1": b / 2,
            "after_exact_match": a,
            "after_pass_at_1": a / 2,
        }
        for i, (b, a) in enumerate(zip(before, after, strict=True))
    ]


def _gain_metrics(items, reward):
    from llmpipe.evaluation.intervals import interval_metrics, paired_difference

    metrics = {"reward": reward, "random_reward_probability": 0.4}
    for figure in ("pass_at_1", "exact_match"):
        metrics |= interval_metrics(
            f"{figure}_gain",
            paired_difference(
                [i[f"before_{figure}"] for i in items], [i[f"after_{figure}"] for i in items]
            ),
        )
    return metrics


def test_the_control_is_recorded_from_its_experiment_and_paired_in_the_report(
    tmp_path, monkeypatch
):
    """llmpipe.control reads the control experiment's metrics and per-problem results from
    its git ref; the report card prints the checker's gain, the control's and the checker over
    the control, paired problem by problem; a control from another SFT model is stale."""
    import random
    import subprocess

    from llmpipe import control, layout
    from llmpipe.evaluation.report import algorithm_difference, control_text
    from llmpipe.io import write_json

    rng = random.Random(0)
    before = [float(rng.random() < 0.4) for _ in range(200)]
    checker = [1.0 if b else float(rng.random() < 0.3) for b in before]  # learns
    # moves at random and as much down as up: 20 problems right before are wrong after, and 20
    # the other way
    flipped = rng.sample([i for i, b in enumerate(before) if b], 20) + rng.sample(
        [i for i, b in enumerate(before) if not b], 20
    )
    noise = [1.0 - b if i in flipped else b for i, b in enumerate(before)]
    monkeypatch.chdir(tmp_path)
    git = lambda *args: subprocess.run(["git", *args], check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    for stage in control.STAGES:  # the experiment's commit: the random reward's results
        write_json(layout.items_file(stage), _task_items(before, noise))
        write_json(layout.metrics_file(stage), _gain_metrics(_task_items(before, noise), "random"))
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "exp")
    git("update-ref", "refs/exps/ab/cdef/control-random-reward", "HEAD")
    recorded = control.record("refs/exps/ab/cdef/control-random-reward", "control-random-reward")
    assert recorded["stages"]["task_grpo"]["items"] == _task_items(before, noise)
    write_json(layout.TASK_CONTROL, recorded)
    for stage in control.STAGES:  # the workspace: the checker's run from the same SFT model
        write_json(layout.items_file(stage), _task_items(before, checker))
        write_json(
            layout.metrics_file(stage), _gain_metrics(_task_items(before, checker), "checker")
        )

    text = control_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "|" in line}
    assert rows["reinforce: checker reward"].count(", up") == 2
    # the two algorithms, paired: the same results after RL are within noise of each other...
    [(name, *difference)] = algorithm_difference()
    assert name.startswith("grpo over reinforce") and all("within noise" in d for d in difference)
    # ...and GRPO left at the control's results is worse than REINFORCE, on both figures
    write_json(layout.items_file("task_grpo"), _task_items(before, noise))
    [(_, *difference)] = algorithm_difference()
    assert all(d.endswith(", down") for d in difference)
    write_json(layout.items_file("task_grpo"), _task_items(before, checker))
    assert "within noise" in rows["reinforce: random reward, p = 0.400 (control)"]
    assert rows["grpo: checker over control"].count(", up") == 2
    # another SFT model (other results before RL): stale, not paired
    write_json(layout.items_file("task_grpo"), _task_items(checker, checker))
    text = control_text()
    assert "Stale for grpo" in text and "grpo: checker over control" not in text
    assert algorithm_difference() == []  # measured from another SFT model: not paired
    assert "reinforce: checker over control" in text
    # a control that did not use the random reward is refused
    write_json(
        layout.metrics_file("task_reinforce"), _gain_metrics(_task_items(before, noise), "checker")
    )
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "not a control")
    with pytest.raises(DataError, match="task_reinforce did not run with the random reward"):
        control.record("HEAD", "x")

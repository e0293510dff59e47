"""The checkable task (llmpipe.task): its problems and its checker."""

import pytest

from llmpipe.task import exact_match, exact_match_reward, make_problems, parse_answer


def test_train_and_test_problems_are_disjoint_and_the_same_for_the_same_seed():
    for kind, digits in (("add", 2), ("reverse", 3)):
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
    for p in make_problems("reverse", 3, 50, 10, seed=0)["train"]:
        digits = p.prompt.removeprefix("reverse ").removesuffix(" =").split()
        assert p.answer.split() == digits[::-1]


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="test: 5000 problems asked"):
        make_problems("reverse", 2, 10, 5000, seed=0)


def test_the_checker_parses_right_wrong_and_malformed_answers():
    assert exact_match(" 1 2 3", " 1 2 3")
    assert exact_match(" 1 2 3\nmore text", " 1 2 3")  # a newline ends the answer
    assert exact_match("123", " 1 2 3")  # spaces aside
    assert not exact_match(" 1 2 4", " 1 2 3")
    assert not exact_match(" 1 2", " 1 2 3")
    assert not exact_match(" 1 2 3 4", " 1 2 3")
    for malformed in ("", " ", " 1 2 x", "the answer is 123", " -1 2 3", "1.23"):
        assert parse_answer(malformed) is None and not exact_match(malformed, " 1 2 3")
    assert exact_match_reward(["q"] * 3, [" 4 2", " 4 3", "x"], answer=[" 4 2"] * 3) == \
        [1.0, 0.0, 0.0]

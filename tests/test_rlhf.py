import inspect
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import TOY_WORDS as WORDS
from conftest import toy_pairs
from llmpipe import layout
from llmpipe.data.chat import PLAIN
from llmpipe.errors import DataError
from llmpipe.model.loading import load_reward_model, load_tokenizer
from llmpipe.rl.grpo import run_grpo
from llmpipe.rl.heldout import length_penalty, rlhf_verdicts
from llmpipe.rl.params import GrpoParams, RewardModelParams
from llmpipe.rl.preference_pairs import gold_pairs, load_preference_set
from llmpipe.rl.rlhf import (
    completion_logprobs,
    pairwise_report,
    reward_scores,
    train_reward_model,
)
from llmpipe.rl.sampling import Completion, Sampling, sample_completions


@pytest.fixture(scope="module")
def policy_dir(micro_pretrained):
    return micro_pretrained / layout.PRETRAIN_MODEL


def test_reward_trainer_learns_a_separable_preference(policy_dir, tmp_path):
    train, heldout = toy_pairs(0, 256), toy_pairs(1, 64)
    p = RewardModelParams(
        learning_rate=1e-3,
        warmup_steps=0,
        epochs=3,
        batch_size=16,
        max_length=64,
    )
    model, tokenizer, trained = train_reward_model(
        policy_dir, train, heldout, PLAIN, p, 0, tmp_path / "live"
    )
    assert trained == len(train)  # none longer than max_length
    assert pairwise_report(model, tokenizer, PLAIN, heldout)["accuracy"] >= 0.9
    assert (tmp_path / "live/plots/metrics/train/loss.tsv").exists()


def grpo_params(**changes) -> GrpoParams:
    values = dict(
        processes=1,
        use_vllm=False,
        degeneration_distinct_drop=0.3,
        degeneration_fluency_rise=1.0,
        use_lora=False,
        lora_r=8,
        lora_alpha=16,
        lora_target_modules=["c_attn", "c_proj"],
        num_generations=4,
        prompts_per_step=4,
        beta=0.0,
        reward="reward_model",
        length_penalty=0.0,
        loss_type="dapo",
        scale_rewards="group",
        learning_rate=1e-2,
        lr_schedule="constant",
        max_completion_length=8,
        temperature=1.0,
        max_steps=15,
        curve_interval=0,
        curve_prompts=1,
    )
    return GrpoParams(**{**values, **changes})


def test_grpo_raises_a_simple_reward_and_calls_it_as_trl_documents(policy_dir, tmp_path):
    from collections import Counter

    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(policy_dir)
    prompts = [" ".join(random.Random(i).choice(WORDS) for _ in range(3)) for i in range(32)]

    def sampled_ids(model) -> list[list[int]]:
        groups = sample_completions(model, tokenizer, prompts, Sampling(4, 8, 1.0, seed=7))
        return [c.ids for group in groups for c in group]

    base_ids = sampled_ids(AutoModelForCausalLM.from_pretrained(policy_dir))
    # The reward: how often a completion uses the base model's favourite token (common enough
    # that GRPO groups differ in reward, so there is a gradient).
    target, _ = Counter(t for ids in base_ids for t in ids).most_common(1)[0]
    seen_kwargs = []

    def target_frequency(prompts, completions, completion_ids, **kwargs):
        seen_kwargs.append(set(kwargs))
        assert len(prompts) == len(completions) == len(completion_ids)
        return [ids.count(target) / max(len(ids), 1) for ids in completion_ids]

    def mean_frequency(ids: list[list[int]]) -> float:
        return sum(target_frequency(ids, ids, ids)) / len(ids)

    model, steps = run_grpo(
        policy_dir, [(target_frequency, 1.0)], prompts, PLAIN, grpo_params(), 0, tmp_path / "live"
    )
    assert steps == 15
    # lr_schedule: constant keeps the rate where it was set, as REINFORCE's does
    rates = (tmp_path / "live/plots/metrics/train/learning_rate.tsv").read_text().split("\n")[1:]
    assert {float(row.split("\t")[1]) for row in rates if row} == {grpo_params().learning_rate}
    after_ids = sampled_ids(model)
    before, after = mean_frequency(base_ids), mean_frequency(after_ids)
    # A rise far beyond sampling noise: the binomial standard error of the difference of the
    # two token frequencies (each over its sampled tokens), 4 of them at least.
    n_before, n_after = sum(map(len, base_ids)), sum(map(len, after_ids))
    noise = math.sqrt(before * (1 - before) / n_before + after * (1 - after) / n_after)
    assert after - before > 4 * noise, (before, after, noise)
    assert {"trainer_state"} <= seen_kwargs[0]  # TRL passes its documented extras


def test_grpo_with_lora_trains_and_returns_a_merged_plain_model(policy_dir, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    def varied(prompts, completions, completion_ids, **kwargs):  # rewards that differ
        return [float(sum(ids) % 7) for ids in completion_ids]

    model, _ = run_grpo(
        policy_dir,
        [(varied, 1.0), (length_penalty, 0.1)],
        ["a b", "c d"],
        PLAIN,
        grpo_params(use_lora=True, max_steps=3, prompts_per_step=2, lr_schedule="linear"),
        0,
        tmp_path / "live",
    )
    # lr_schedule: linear reaches TRL: the rate decays over the 3 steps as REINFORCE's does
    rates = (tmp_path / "live/plots/metrics/train/learning_rate.tsv").read_text().split("\n")[1:]
    lr = grpo_params().learning_rate
    assert [float(row.split("\t")[1]) for row in rates if row] == pytest.approx(
        [lr, lr * 2 / 3, lr / 3]
    )
    assert not isinstance(model, PeftModel)
    assert not any("lora" in name for name, _ in model.named_parameters())
    base = load_file(policy_dir / "model.safetensors")
    trained = model.state_dict()
    assert not torch.equal(
        trained["transformer.h.0.attn.c_attn.weight"], base["transformer.h.0.attn.c_attn.weight"]
    )  # the merged adapter
    assert torch.equal(trained["transformer.wte.weight"], base["transformer.wte.weight"])


def test_kl_of_a_policy_to_itself_is_zero_and_positive_to_another(policy_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    prompts = ["the value of", "a list is"]
    groups = sample_completions(policy, tokenizer, prompts, Sampling(3, 6, 1.0, seed=0))
    prompt_ids = [
        tokenizer(q, add_special_tokens=False).input_ids for q in prompts for _ in range(3)
    ]
    ids = [c.ids for g in groups for c in g]
    same = completion_logprobs(policy, prompt_ids, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert (
        sum(
            a - b for a, b in zip(same, completion_logprobs(reloaded, prompt_ids, ids), strict=True)
        )
        == 0
    )
    other = AutoModelForCausalLM.from_pretrained(policy_dir)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.05 * torch.randn_like(param))
    kl = sum(
        a - b for a, b in zip(same, completion_logprobs(other, prompt_ids, ids), strict=True)
    ) / len(ids)
    assert kl > 0  # on the policy's own samples, the expected log-ratio is a KL


def test_completion_logprobs_batched_equal_one_at_a_time(policy_dir, monkeypatch):
    """Right padding after every real token changes nothing but the sums' float order; an
    empty completion is 0; a batch is cut to the logits budget."""
    from transformers import AutoModelForCausalLM

    from llmpipe.rl import rlhf

    tokenizer = load_tokenizer(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    prompts = ["the value of", "a list is", "return", "a much longer prompt about the file name"]
    prompt_ids = [tokenizer(q, add_special_tokens=False).input_ids for q in prompts]
    completions = [[5, 9, 11], [], [7] * 9, [3, 4]]
    alone = completion_logprobs(policy, prompt_ids, completions, 0.7, max_rows=1)
    together = completion_logprobs(policy, prompt_ids, completions, 0.7)
    assert together == pytest.approx(alone, rel=1e-5, abs=1e-5) and together[1] == 0.0
    monkeypatch.setattr(rlhf, "LOGPROB_BATCH_LOGITS", 1)  # one row a batch, however small
    assert completion_logprobs(policy, prompt_ids, completions, 0.7) == alone


def test_the_sampler_draws_from_the_distribution_and_never_a_cut_token():
    from llmpipe.rl.sampling import InverseCdfSample

    torch.manual_seed(0)
    probs = torch.tensor([0.2, 0.5, 0.0, 0.3])
    scores = probs.log().expand(20000, 4)  # log 0 = -inf: a token top-k or top-p cut
    drawn = InverseCdfSample()(None, scores).argmax(-1)
    shares = torch.bincount(drawn, minlength=4) / len(drawn)
    assert shares[2] == 0 and torch.allclose(shares, probs, atol=0.015), shares


def test_sampling_is_reproducible_and_top_k_1_is_greedy(policy_dir):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    prompts = ["the value of", "a list is"]

    def texts(sampling):
        groups = sample_completions(policy, tokenizer, prompts, sampling)
        return [c.ids for g in groups for c in g]

    assert texts(Sampling(3, 8, 1.0, seed=1)) == texts(Sampling(3, 8, 1.0, seed=1))
    assert texts(Sampling(3, 8, 1.0, seed=1)) != texts(Sampling(3, 8, 1.0, seed=2))
    greedy = texts(Sampling(1, 8, 0.0, seed=0))
    assert texts(Sampling(1, 8, 1.3, seed=5, top_k=1)) == greedy


def test_reward_scores_do_not_depend_on_padding(policy_dir):
    tokenizer = load_tokenizer(policy_dir)
    model = load_reward_model(policy_dir, tokenizer)
    prompts, completions = ["a short", "a longer text,"], [" one", " never padded"]
    together = reward_scores(model, tokenizer, PLAIN, prompts, completions)
    alone = [
        reward_scores(model, tokenizer, PLAIN, [q], [c])[0]
        for q, c in zip(prompts, completions, strict=True)
    ]
    assert together == pytest.approx(alone, abs=1e-5)


def test_reward_functions_have_trls_signature():
    params = inspect.signature(length_penalty).parameters
    assert list(params)[:3] == ["prompts", "completions", "completion_ids"]
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert length_penalty(
        prompts=["a"], completions=["b"], completion_ids=[[1, 2, 3]], trainer_state=None
    ) == [-3.0]


def test_gold_pairs_orders_by_gold_and_drops_ties():
    groups = [
        [Completion(t, []) for t in texts]
        for texts in (["bad", "good", "meh", "fine"], ["same", "same", "same", "same"])
    ]
    gold = {"bad": -1.0, "good": 1.0, "meh": 0.0, "fine": 0.5, "same": 0.2}
    pairs, ties = gold_pairs(["p1", "p2"], groups, lambda texts: [gold[t] for t in texts], 2)
    assert ties == 1
    assert [(q["chosen"], q["rejected"]) for q in pairs] == [("good", "bad"), ("fine", "meh")]


def test_a_pair_of_the_same_text_is_dropped_like_a_tie():
    from llmpipe.rl.preference_pairs import gold_pairs

    gold = {"Good, day!": 0.9, "good  day": 0.1, "bad": 0.0}
    score = lambda texts: [gold[t] for t in texts]  # noqa: E731
    same = [Completion(t, []) for t in ("Good, day!", "good  day")]  # the same words
    assert gold_pairs(["p"], [same], score, 1) == ([], 1)
    other = [Completion(t, []) for t in ("Good, day!", "bad")]
    pairs, ties = gold_pairs(["p"], [other], score, 1)
    assert [(q["chosen"], q["rejected"]) for q in pairs] == [("Good, day!", "bad")] and ties == 0


def test_prompts_that_share_a_stem_count_once():
    from llmpipe.rl.preference_pairs import one_per_stem, prompt_stem

    assert prompt_stem("The  value, of the list -- is: one two three four") == (
        "the value of the list is one two"
    )
    prompts = ["The list is long", "the list, is long!", "A list is short", "The list is long."]
    assert one_per_stem(prompts) == ["The list is long", "A list is short"]
    assert one_per_stem(prompts, exclude={"a list is short"}) == ["The list is long"]


def test_preference_set_with_missing_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "prefs.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "q", "chosen": "a", "answer": "b"}]), path)
    with pytest.raises(
        DataError,
        match=r"file:.*prefs\.parquet: no column 'rejected' "
        r"\(columns: prompt, chosen, answer\)",
    ):
        load_preference_set(f"file:{path}", "train")
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    assert load_preference_set(f"hf:{path}", "train") == [
        {"prompt": "q", "chosen": "a", "rejected": "b"}
    ]


def test_the_preference_directory_round_trips(tmp_path):
    from llmpipe.rl.preferences import (
        GoldSpec,
        PreferenceSet,
        read_fresh,
        read_gold_spec,
        read_pairs,
        read_prompts,
    )

    pairs = {"train": toy_pairs(0, 3), "heldout": toy_pairs(1, 2)}
    prompts = {split: sorted({q["prompt"] for q in rows}) for split, rows in pairs.items()}
    fresh = [{"prompt": "q", "completions": ["a", "b"], "gold": [0.1, -0.2]}]
    gold = GoldSpec("vader", None, 1.0, ("argument", "value"))
    PreferenceSet(pairs, prompts, fresh, gold).write(tmp_path / "prefs")
    assert [read_pairs(tmp_path / "prefs", s) for s in ("train", "heldout")] == [
        pairs["train"],
        pairs["heldout"],
    ]
    assert read_prompts(tmp_path / "prefs", "heldout") == prompts["heldout"]
    assert read_fresh(tmp_path / "prefs") == fresh
    assert read_gold_spec(tmp_path / "prefs") == gold
    assert not list(tmp_path.glob(".prefs*"))  # written as a whole, no temporary left
    with pytest.raises(DataError, match=r"gold\.json: not found"):
        read_gold_spec(tmp_path)


VARIED = [
    "The function returns a sorted copy of the list.",
    "Raise an error when the file cannot be opened for reading.",
    "Each module keeps its own namespace and attributes.",
]
LOOPING = [
    "the value of the value of the value of the value of the value",
    "the value of the value of the value of the first value of the value",
    "value of the value of the value of the value",
]


def test_degeneration_metrics_tell_a_loop_from_text():
    from llmpipe.rl.degeneration import distinct_n, repeated_ngram_share

    assert distinct_n(VARIED, 1) > 0.9 and distinct_n(VARIED, 2) == 1.0
    assert distinct_n(LOOPING, 2) < 0.2
    assert repeated_ngram_share(VARIED, 3) == 0.0
    assert repeated_ngram_share(LOOPING, 3) > 0.6
    assert repeated_ngram_share(["a b a b a b"], 3) == pytest.approx(2 / 4)  # aba bab aba bab
    assert distinct_n([""], 2) == 1.0 and repeated_ngram_share([""], 3) == 0.0


def report_of(
    texts: list[str], gold: float, reference_loss: float, proxy: float = 0.0, heldout=None
) -> dict:
    """A policy_report of 40 held-out prompts whose gold (and reward-model) scores spread by
    +-0.05 around `gold` (`proxy` moves the reward model's alone; the held-out judges follow
    gold unless `heldout` says where they are)."""
    from llmpipe.rl.degeneration import distinct_n, repeated_ngram_share

    spread = [0.05 * (-1) ** i for i in range(40)]
    items = [
        {
            "prompt": f"prompt {i}",
            "gold_score": gold + d,
            "reward_model_score": gold + proxy + d,
            "afinn_score": (gold if heldout is None else heldout) + d,
            "textblob_score": (gold if heldout is None else heldout) + d,
            "kl_to_reference": 0.0,
            "completion_length": 12.0,
        }
        for i, d in enumerate(spread)
    ]
    return {
        "reward_model_score": gold + proxy,
        "gold_score": gold,
        "kl_to_reference": 0.0,
        "completion_length": 12.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "repeated_3gram_share": repeated_ngram_share(texts, 3),
        "reference_loss": reference_loss,
        "afinn_score": gold if heldout is None else heldout,
        "textblob_score": gold if heldout is None else heldout,
        "items": items,
    }


def flags(before: dict, after: dict) -> dict:
    from llmpipe.evaluation.intervals import gain_metrics
    from llmpipe.rl.judges import HELDOUT_JUDGES

    gains = {"gold_score": "gold_gain", "reward_model_score": "reward_model_gain"}
    metrics = gain_metrics(before, after, {**gains, **HELDOUT_JUDGES})
    return {**metrics, **rlhf_verdicts(before, after, metrics, 0.3, 1.0)}


def test_the_degeneration_flag_fires_when_gold_rises_on_a_loop():
    before = report_of(VARIED, gold=0.05, reference_loss=4.0)
    looped = flags(before, report_of(LOOPING, 0.4, 4.2))
    assert looped["gold_gain_lo"] > 0 and looped["distinct_2_change"] < -0.3
    assert looped["degeneration_suspected"] and not looped["reward_hacking_suspected"]
    # Fluent but improbable to the SFT model counts too; unchanged text does not; nor a loop
    # that the gold scorer did not reward.
    assert flags(before, report_of(VARIED, 0.4, 5.5))["degeneration_suspected"]
    assert not flags(before, report_of(VARIED, 0.4, 4.1))["degeneration_suspected"]
    assert not flags(before, report_of(LOOPING, 0.01, 6.0))["degeneration_suspected"]


def test_the_reward_hacking_flag_reads_the_intervals():
    before = report_of(VARIED, gold=0.05, reference_loss=4.0)
    # The proxy rises, gold stays where it was: fires.
    hacked = flags(before, report_of(VARIED, 0.05, 4.0, proxy=0.5))
    assert hacked["reward_model_gain_lo"] > 0 and hacked["gold_gain"] == 0
    assert hacked["reward_hacking_suspected"]
    # Both rise: quiet.
    assert not flags(before, report_of(VARIED, 0.3, 4.0, proxy=0.5))["reward_hacking_suspected"]
    # Gold moves by less than its noise: the proxy's rise is not followed, so it fires.
    noisy = report_of(VARIED, 0.05, 4.0, proxy=0.5)
    noisy["items"] = [
        {**item, "gold_score": item["gold_score"] + 0.2 * (-1) ** (i // 2)}
        for i, item in enumerate(noisy["items"])
    ]
    noisy["gold_score"] += 0.01
    assert flags(before, noisy)["gold_gain_lo"] <= 0 < flags(before, noisy)["gold_gain"]
    assert flags(before, noisy)["reward_hacking_suspected"]


def test_the_overoptimisation_flag_fires_when_the_heldout_judges_do_not_follow():
    before = report_of(VARIED, gold=0.05, reference_loss=4.0)
    # Proxy and gold rise (one word both like), the held-out judges stay where they were.
    gamed = flags(before, report_of(VARIED, 0.4, 4.0, proxy=0.3, heldout=0.05))
    assert gamed["gold_gain_lo"] > 0 and gamed["afinn_gain"] == 0
    assert gamed["overoptimisation_suspected"] and not gamed["reward_hacking_suspected"]
    # Everything rises together: quiet.
    assert not flags(before, report_of(VARIED, 0.4, 4.0, proxy=0.3))["overoptimisation_suspected"]
    # Diversity collapses: fires whatever the judges say.
    assert flags(before, report_of(LOOPING, 0.4, 4.0, proxy=0.3))["overoptimisation_suspected"]


def test_the_domain_vocabulary_of_the_corpus_scores_nothing():
    from llmpipe.rl.gold import domain_words, load_gold_scorer, scorer_lexicon

    paragraphs = (
        ["Return the value of x."] * 30 + ["A great, wonderful day."] + ["Plain text."] * 69
    )
    words = domain_words(paragraphs, scorer_lexicon("vader"), 0.05)
    assert words == ["value"]  # in 30% of the paragraphs; "great" in 1%: sentiment
    assert scorer_lexicon("hf:some/classifier") is None  # nothing to neutralise
    plain, neutral = load_gold_scorer("vader"), load_gold_scorer("vader", neutral_words=words)
    assert plain(["Return the value."])[0] > 0 and neutral(["Return the value."]) == [0.0]
    assert neutral(["A great day."]) == plain(["A great day."]) and plain(["A great day."])[0] > 0
    assert load_gold_scorer("vader")(["Return the value."]) == plain(["Return the value."])


def test_the_heldout_judges_do_not_pay_for_the_word_the_gold_scorer_likes():
    from llmpipe.rl.gold import load_gold_scorer
    from llmpipe.rl.judges import load_heldout_judges

    plain, worded = "the list of the things", "the values of the things"
    gold = load_gold_scorer("vader")
    assert gold([worded])[0] > gold([plain])[0]  # VADER likes "values"
    for name, judge in load_heldout_judges().items():
        assert judge([worded]) == judge([plain]), name  # neither held-out judge does
        assert judge(["a good and wonderful day"])[0] > judge([plain])[0], name


def test_rising_words_name_what_a_policy_learned_to_say():
    from llmpipe.rl.degeneration import rising_words, word_shares

    before = word_shares(["a plain text", "another text", "more plain words", "text again"])
    after = word_shares(["values text", "values again", "plain values", "text values"])
    assert before["text"] == 0.75 and after["values"] == 1.0
    assert rising_words(before, after)[0] == ("values", 0.0, 1.0)


def test_the_gold_score_of_a_loop_loses_its_repeated_share():
    from llmpipe.rl.degeneration import repeated_ngram_share
    from llmpipe.rl.gold import load_gold_scorer

    plain, penalised = load_gold_scorer("vader"), load_gold_scorer("vader", repetition_penalty=1.0)
    # The loop scores exactly its repeated-trigram share lower with the penalty; varied text is
    # unchanged.
    for text in LOOPING + VARIED:
        assert penalised([text])[0] == pytest.approx(
            plain([text])[0] - repeated_ngram_share([text], 3)
        )
    assert penalised(VARIED) == plain(VARIED)
    assert penalised(LOOPING[1:2])[0] < plain(LOOPING[1:2])[0] - 0.5


def test_vader_counts_a_liked_word_once_however_often_it_is_said():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from llmpipe.rl.gold import each_word_once, load_gold_scorer

    raw = SentimentIntensityAnalyzer().polarity_scores
    gold = load_gold_scorer("vader")
    spam = "the values are the value as the number list values, in the length of values,"
    # VADER itself pays for each use of a liked word; the gold score does not.
    assert raw("a value value value value")["compound"] > raw("a value")["compound"]
    assert gold(["a value value value value"]) == gold(["a value"])
    lexicon = SentimentIntensityAnalyzer().lexicon
    assert (
        each_word_once(spam, lexicon)
        == "the values are the value as the number list in the length of"
    )
    # only the lexicon's words go: a negation stays where VADER reads it
    assert (
        each_word_once("Good, good GOOD! not bad but not good", lexicon) == "Good, not bad but not"
    )
    assert gold(VARIED) == [raw(t)["compound"] for t in VARIED]  # no word repeats there


def test_the_overoptimisation_curve_logs_its_points_and_leaves_training_randomness_alone(tmp_path):
    from types import SimpleNamespace

    from llmpipe.rl.harness import HeldoutCurve
    from llmpipe.train.callbacks import OveroptimisationCurve, TrainerCurves
    from llmpipe.train.tracking import curves_live

    model = torch.nn.Linear(2, 2)
    model.train()

    def report(m):  # draws random numbers, as sampling completions does, and sets eval mode
        m.eval()
        torch.manual_seed(0)
        return {key: float(torch.rand(1)) for key in layout.HELDOUT_CURVES}

    curves = TrainerCurves(tmp_path)
    curves.live = curves_live(tmp_path)
    callback = OveroptimisationCurve(curves, HeldoutCurve(report, interval=2))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None, model=model)
    for step in (1, 2, 3, 4):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None, model=model)
    assert torch.equal(torch.rand(3), expected) and model.training
    for key in layout.HELDOUT_CURVES:
        rows = (tmp_path / "plots/metrics/heldout" / f"{key}.tsv").read_text().splitlines()[1:]
        assert [row.split("\t")[0] for row in rows] == ["0", "2", "4"]
    # Outside the main process (no Live): nothing is measured.
    OveroptimisationCurve(TrainerCurves(tmp_path / "other"), HeldoutCurve(None, 1)).on_train_begin(
        None, SimpleNamespace(global_step=0), None, model=model
    )

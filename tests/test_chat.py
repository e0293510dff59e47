"""Instruct bases: prompts through the chat template, and a tokenizer that adds a BOS handled
the same way when the reward model is trained and when it scores (llmpipe.data.chat). On micro
random-init Llama and Qwen2 models with an instruct-style tokenizer (conftest)."""

import json

import pytest

from conftest import save_micro_instruct, toy_pairs
from llmpipe.data.chat import PLAIN, PromptFormat, message_text
from llmpipe.errors import DataError, ParamsError
from llmpipe.model.loading import load_tokenizer
from llmpipe.rl.params import RewardModelParams
from llmpipe.rl.preference_pairs import load_preference_set

CHAT = PromptFormat(chat=True)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def instruct_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    save_micro_instruct(directory, request.param)
    return directory


def test_one_bos_and_the_template_in_every_format(instruct_dir):
    tokenizer = load_tokenizer(instruct_dir)
    bos, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    plain = PLAIN.prompt_ids(tokenizer, "the value of")
    assert plain[0] == bos and plain.count(bos) == 1  # the tokenizer's own BOS, as TRL's
    prompt = CHAT.prompt_ids(tokenizer, "the value of")
    assert prompt[0] == bos and prompt.count(bos) == 1  # the template's BOS, not a second one
    assert tokenizer.decode(prompt).endswith("<|start|>assistant\n")  # the generation prompt
    scored = CHAT.scored_ids(tokenizer, "the value of", " a list")
    assert scored[: len(prompt)] == prompt  # the answer, then its end of turn
    assert tokenizer.decode(scored[len(prompt) :]).startswith(" a list<|eot|>")
    # The template would write the time of day; the pinned date makes every rendering the same.
    assert CHAT.prompt_ids(tokenizer, "the value of") == prompt
    assert PLAIN.scored_ids(tokenizer, "the value of", " a list")[-1] != eot  # no EOS added
    assert CHAT.trl_prompt("q") == [{"role": "user", "content": "q"}]
    assert message_text(CHAT.trl_completion("a")) == "a" and message_text("a") == "a"


def test_a_chat_format_without_a_template_names_the_param(micro_pretrained):
    from llmpipe import layout

    tokenizer = load_tokenizer(micro_pretrained / layout.PRETRAIN_MODEL)
    with pytest.raises(
        ParamsError,
        match=r"preferences\.chat: true needs a tokenizer with a "
        r"chat template",
    ):
        CHAT.check(tokenizer, "preferences.chat")
    PLAIN.check(tokenizer, "preferences.chat")  # plain needs nothing


@pytest.mark.parametrize("prompt_format", [PLAIN, CHAT], ids=["plain", "chat"])
def test_the_reward_model_trains_on_the_tokens_it_scores(
    instruct_dir, prompt_format, tmp_path, monkeypatch
):
    import trl

    from llmpipe.rl.rlhf import pairwise_report, train_reward_model

    seen = {}

    class Recording(trl.RewardTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["row"] = self.train_dataset[0]

    monkeypatch.setattr(trl, "RewardTrainer", Recording)
    train, heldout = toy_pairs(0, 128), toy_pairs(1, 32)
    p = RewardModelParams(
        learning_rate=3e-3,
        warmup_steps=0,
        epochs=3,
        batch_size=16,
        max_length=128,
    )
    model, tokenizer, trained = train_reward_model(
        instruct_dir, train, heldout, prompt_format, p, 0, tmp_path / "live"
    )
    assert trained == len(train)
    first = train[0]
    # What RewardTrainer trained on is what reward_scores reads: no EOS appended to plain
    # pairs, the BOS once.
    for side in ("chosen", "rejected"):
        assert list(seen["row"][f"{side}_ids"]) == prompt_format.scored_ids(
            tokenizer, first["prompt"], first[side]
        )
    assert pairwise_report(model, tokenizer, prompt_format, heldout)["accuracy"] >= 0.9


def test_grpo_and_reinforce_prompt_an_instruct_model_through_its_template(instruct_dir, tmp_path):
    from test_rlhf import grpo_params

    from llmpipe.model.loading import load_causal_lm
    from llmpipe.rl.grpo import run_grpo
    from llmpipe.rl.reinforce import ReinforceConfig, reinforce, sample

    tokenizer = load_tokenizer(instruct_dir)
    seen = []

    def short(prompts, completions, completion_ids, **kwargs):
        seen.append((prompts[0], completions[0]))
        return [-float(len(ids)) for ids in completion_ids]

    prompts = ["the value of", "a list is"]
    model, steps = run_grpo(
        instruct_dir,
        [(short, 1.0)],
        prompts,
        CHAT,
        grpo_params(max_steps=2, prompts_per_step=2, lora_target_modules=["all-linear"]),
        0,
        tmp_path / "live",
    )
    assert steps == 2
    prompt, completion = seen[0]
    assert prompt == [{"role": "user", "content": prompt[0]["content"]}]  # TRL got messages
    assert completion[0]["role"] == "assistant"

    rollout = sample(model, tokenizer, prompts, 2, 4, 1.0, CHAT)
    for row in range(2):  # the first prompt's two completions, after its templated prompt
        prompt_ids = CHAT.prompt_ids(tokenizer, prompts[0])
        real = rollout.ids[row, : rollout.prompt_length][
            rollout.attention_mask[row, : rollout.prompt_length].bool()
        ]
        assert real.tolist() == prompt_ids
    policy, _ = load_causal_lm(instruct_dir)
    reference, _ = load_causal_lm(instruct_dir)
    cfg = ReinforceConfig(
        num_generations=2,
        prompts_per_step=2,
        max_steps=1,
        learning_rate=1e-3,
        max_completion_length=4,
        temperature=1.0,
        baseline="rloo",
        loss_normalisation="token",
        beta=0.0,
        grad_clip=1.0,
    )
    assert (
        reinforce(
            policy,
            reference,
            tokenizer,
            [{"prompt": q} for q in prompts],
            [(lambda completions, **kw: [float(len(c)) for c in completions], 1.0)],
            cfg,
            0,
            CHAT,
        )
        == 1
    )


def test_a_ready_preference_set_with_its_own_column_names(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        json.dumps({"question": "q", "full_chosen": "a", "full_rejected": "b", "chosen": "x"})
        + "\n"
    )
    assert load_preference_set(
        f"file:{path}", "train", ("question", "full_chosen", "full_rejected")
    ) == [{"prompt": "q", "chosen": "a", "rejected": "b"}]
    with pytest.raises(DataError, match="no column 'prompt'.*preferences.prompt_column"):
        load_preference_set(f"file:{path}", "train")

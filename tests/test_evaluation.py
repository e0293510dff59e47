"""Bits per byte: the loss summed over the targets' text, over its UTF-8 bytes, in bits, so that
models with different tokenizers compare (evaluation.window_scores); and lm-evaluation-harness
on the shipped offline task (llmpipe.harness)."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from llmpipe import layout
from llmpipe.evaluation import token_byte_lengths, window_scores
from llmpipe.loading import load_causal_lm

TEXT = "Return the naïve 🐍 sum."  # a micro model has 32 positions


class OneWindow:
    """A token source with one evaluation window (what window_scores reads of a TokenBin)."""

    def __init__(self, ids: list[int]):
        self.x, self.y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])

    def eval_batches(self, block_size, count, batch_size):
        yield self.x, self.y


@pytest.fixture(scope="module")
def model_and_tokenizer(micro_pretrained):
    model, tokenizer = load_causal_lm(micro_pretrained / layout.PRETRAIN_MODEL, device="cpu")
    return model.eval(), tokenizer


def test_token_bytes_are_the_tokens_utf8_bytes_and_none_for_end_of_text(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    lengths = token_byte_lengths(tokenizer)
    assert lengths[tokenizer.eos_token_id] == 0
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    assert sum(lengths[i].item() for i in ids) == len(TEXT.encode()) > len(TEXT)  # multibyte


def test_bits_per_byte_is_the_summed_loss_over_the_texts_bytes(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert len(ids) <= model.config.n_positions + 1
    window = OneWindow(ids)
    score = window_scores(model, window, len(ids) - 1, 1, 1, token_byte_lengths(tokenizer))

    with torch.no_grad():
        losses = F.cross_entropy(model(window.x).logits[0].float(), window.y[0],
                                 reduction="none")
    text_targets = ids[1:-1]  # the end of text is no text: neither its loss nor bytes count
    target_bytes = len(tokenizer.decode(text_targets).encode())
    assert target_bytes == len(TEXT.encode()) - len(tokenizer.decode(ids[:1]).encode())
    expected = losses[:-1].sum().item() / (target_bytes * math.log(2))
    assert score.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert score.loss == pytest.approx(losses.mean().item(), rel=1e-6)  # every target


class SentencePieceLike:
    """What token_byte_lengths reads of a tokenizer whose decoder is not byte-level (Llama-2,
    Mistral, Gemma: `▁` for a space, byte-fallback tokens for bytes outside the vocabulary)."""

    all_special_ids = [0]
    backend_tokenizer = type("Backend", (), {"decoder": object()})()
    vocab = {"<s>": 0, "▁the": 1, "▁": 2, "é": 3, "<0x0A>": 4, "ing": 5}

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


def test_token_bytes_of_a_sentencepiece_vocabulary():
    lengths = token_byte_lengths(SentencePieceLike()).tolist()
    assert lengths == [0, 4, 1, 2, 1, 3]  # special; " the"; " "; é is 2 bytes; one byte; "ing"


def test_the_harness_runs_the_shipped_offline_task_on_a_micro_model(model_and_tokenizer,
                                                                     monkeypatch):
    from llmpipe.cloze import CLOZE_FILE
    from llmpipe.harness import run_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = model_and_tokenizer
    items = [json.loads(line) for line in CLOZE_FILE.read_text().splitlines()]
    assert len(items) == 200 and all(len(i["choices"]) == 4 and
                                     i["choices"][i["label"]] for i in items)
    figures = run_harness(model, tokenizer, ["llmpipe_cloze"], limit=8, batch_size=8, seed=0)
    acc = figures["llmpipe_cloze"]["acc"]
    assert acc * 8 == round(acc * 8) and 0 <= acc <= 1  # a share of the 8 items
    assert figures["llmpipe_cloze"]["acc_stderr"] > 0


def test_harness_params_are_checked_before_any_work():
    from llmpipe.errors import ParamsError
    from llmpipe.harness import check_harness

    check_harness([])
    check_harness(None)
    check_harness(["llmpipe_cloze"])
    with pytest.raises(ParamsError, match=r"^evaluate.harness_tasks: unknown task\(s\) "
                                          r"\['hellaswagg'\]"):
        check_harness(["llmpipe_cloze", "hellaswagg"])

"""Bits per byte: the loss summed over the targets' text, over its UTF-8 bytes, in bits, so that
models with different tokenizers compare (evaluation.window_scores); and lm-evaluation-harness
on the shipped offline task (llmpipe.evaluation.harness)."""

import json
import math
import re
import sys

import pytest
import torch
from torch.nn import functional as F

from llmpipe import layout
from llmpipe.errors import DataError
from llmpipe.evaluation.scores import token_byte_lengths, window_scores
from llmpipe.model.loading import load_causal_lm

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
        losses = F.cross_entropy(model(window.x).logits[0].float(), window.y[0], reduction="none")
    text_targets = ids[1:-1]  # the end of text is no text: neither its loss nor bytes count
    target_bytes = len(tokenizer.decode(text_targets).encode())
    assert target_bytes == len(TEXT.encode()) - len(tokenizer.decode(ids[:1]).encode())
    expected = losses[:-1].sum().item() / (target_bytes * math.log(2))
    assert score.bits_per_byte == pytest.approx(expected, rel=1e-6)
    assert score.loss == pytest.approx(losses.mean().item(), rel=1e-6)  # every target
    assert score.window_losses == pytest.approx((score.loss,), rel=1e-6)  # one window


def test_a_perplexity_interval_carries_the_window_losses_through_exp():
    from llmpipe.evaluation.intervals import Z_95, estimate
    from llmpipe.evaluation.scores import WindowScore, loss_change_metrics

    windows = (2.0, 2.2, 1.8, 2.4, 1.6)
    score = WindowScore(2.0, None, windows)
    m = score.perplexity_metrics()
    se = estimate(windows).se
    assert m["val_perplexity"] == pytest.approx(math.exp(2.0))
    assert (m["val_perplexity_lo"], m["val_perplexity_hi"]) == pytest.approx(
        (math.exp(2.0 - Z_95 * se), math.exp(2.0 + Z_95 * se))
    )
    # The same model on the same windows: a change of exactly 0, with no width.
    same = loss_change_metrics(score, score, "change")
    assert same == {"change": 0.0, "change_lo": 0.0, "change_hi": 0.0}
    # A model better on every window by 0.1: the paired change is -0.1 and sure of it, although
    # the windows differ by far more than that.
    better = WindowScore(1.9, None, tuple(w - 0.1 for w in windows))
    change = loss_change_metrics(score, better, "change")
    assert change["change"] == pytest.approx(-0.1) and change["change_hi"] < 0


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


def cloze_corpus(tmp_path, seed, tokenizer, val_fraction=0.25):
    """A corpus of documents whose sentences each name their document, split by tokenize's
    rule under `seed`: (the token directory, {split: documents})."""
    from llmpipe.data.tokenization import (
        DocumentSplit,
        FastEncoder,
        split_by_document,
        write_corpus,
    )

    docs = [
        " ".join(
            f"In document d{d} sentence {s} the words run on and on until it ends at w{d}x{s}."
            for s in range(6)
        )
        for d in range(40)
    ]
    rule = DocumentSplit.fit(docs, val_fraction, seed, "cloze")
    write_corpus(tmp_path, iter(docs), rule, FastEncoder(tokenizer), len(tokenizer), "test")
    return tmp_path, split_by_document(docs, val_fraction, seed, "cloze")


@pytest.mark.parametrize("seed", [1, 2])
def test_cloze_items_come_from_the_validation_split_of_the_seed_that_drew_it(tmp_path, seed):
    from llmpipe.data.tokenization import train_bpe
    from llmpipe.data.tokens import TokenBin
    from llmpipe.evaluation.cloze import build_cloze

    tokenizer = train_bpe(
        [f"In document d{d} sentence the words run on until it ends at w{d}x." for d in range(40)],
        vocab_size=400,
        min_frequency=1,
    )
    corpus, split = cloze_corpus(tmp_path, seed, tokenizer)
    items = build_cloze(TokenBin.open(corpus, "val"), tokenizer, seed, count=50)
    assert len(items) >= 20
    val_names = {doc.split()[2] for doc in split["val"]}
    train_names = {doc.split()[2] for doc in split["train"]}
    for item in items:  # every sentence names its document
        sources = set(re.findall(r"\bd\d+\b", " ".join([item["context"], *item["choices"]])))
        assert sources and sources <= val_names and not sources & train_names
    # another seed draws another split, and the items follow it
    other, moved = cloze_corpus(tmp_path / "other", seed + 10, tokenizer)
    assert {d.split()[2] for d in moved["val"]} != val_names
    again = build_cloze(TokenBin.open(other, "val"), tokenizer, seed + 10, count=50)
    assert {i["context"] for i in again} != {i["context"] for i in items}
    one_document, _ = cloze_corpus(tmp_path / "one", seed, tokenizer, val_fraction=0.03)
    with pytest.raises(DataError, match=r"val\.bin: no cloze item from 1 validation doc"):
        build_cloze(TokenBin.open(one_document, "val"), tokenizer, seed)


def test_the_harness_runs_the_shipped_offline_task_on_a_micro_model(
    model_and_tokenizer, monkeypatch, tmp_path
):
    from llmpipe.evaluation.cloze import cloze_items
    from llmpipe.evaluation.harness import run_harness
    from llmpipe.io import write_jsonl

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tokenizer = model_and_tokenizer
    docs = [
        " ".join(f"Item {d} says that sentence {s} of it ends in word w{d}x{s}." for s in range(4))
        for d in range(10)
    ]
    items = cloze_items(docs, 8, seed=0)
    assert len(items) == 8 and all(
        len(i["choices"]) == 4 and i["choices"][i["label"]] for i in items
    )
    write_jsonl(tmp_path / "cloze.jsonl", items)
    figures = run_harness(
        model,
        tokenizer,
        ["llmpipe_cloze"],
        limit=8,
        batch_size=8,
        seed=0,
        cloze_items=tmp_path / "cloze.jsonl",
    )
    acc = figures["llmpipe_cloze"]["acc"]
    assert acc * 8 == round(acc * 8) and 0 <= acc <= 1  # a share of the 8 items
    assert figures["llmpipe_cloze"]["acc_stderr"] > 0


def test_harness_params_are_checked_before_any_work():
    from llmpipe.errors import ParamsError
    from llmpipe.evaluation.harness import check_harness

    check_harness([])
    check_harness(None)
    check_harness(["llmpipe_cloze"])
    with pytest.raises(
        ParamsError,
        match=r"^evaluate.harness_tasks: unknown task\(s\) "
        r"\['hellaswagg'\]",
    ):
        check_harness(["llmpipe_cloze", "hellaswagg"])


SHARDED_EVAL = """
import json, sys
import numpy as np, torch, torch.distributed as dist
from llmpipe.data.tokens import TokenBin
from llmpipe.evaluation.scores import window_scores
from llmpipe.model.gpt import GPT, GPTConfig

torch.set_num_threads(1)
dist.init_process_group("gloo")
torch.manual_seed(0)  # the same weights in every process
model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32))
bins = TokenBin.open(sys.argv[1], "val")
score = window_scores(model, bins, 16, 13, 4, torch.ones(256, dtype=torch.long), sharded=True)
if dist.get_rank() == 0:
    open(sys.argv[2], "w").write(json.dumps([score.loss, score.bits_per_byte, score.window_losses]))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_evaluation_sharded_over_two_processes_equals_one_process(tmp_path):
    """pretrain evaluates on every rank, each scoring its share of the batches; the gathered
    figures equal a single process's bit for bit (13 windows in batches of 4: ranks get 2 and
    2 batches, the last one short)."""
    import numpy as np

    from conftest import ROOT, run
    from llmpipe.data.tokens import TokenBin, write_meta
    from llmpipe.model.gpt import GPT, GPTConfig

    tokens = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    write_meta(
        tmp_path,
        {
            "dtype": "uint16",
            "vocab_size": 256,
            "eot_id": 0,
            "splits": {"val": {"tokens": 2000, "documents": 1, "sha256": ""}},
        },
    )
    (tmp_path / "sharded.py").write_text(SHARDED_EVAL)
    run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(tmp_path / "sharded.py"),
            str(tmp_path),
            str(tmp_path / "out.json"),
        ],
        tmp_path,
        PYTHONPATH=str(ROOT / "src"),
        OMP_NUM_THREADS="1",
    )
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32))
    single = window_scores(
        model, TokenBin.open(tmp_path, "val"), 16, 13, 4, torch.ones(256, dtype=torch.long)
    )
    assert json.loads((tmp_path / "out.json").read_text()) == [
        single.loss,
        single.bits_per_byte,
        list(single.window_losses),  # every window once, in order
    ]
    assert len(single.window_losses) == 13

import dataclasses
import json

import numpy as np
import pytest
import torch

from llmpipe.data.tokenization import write_corpus
from llmpipe.data.tokens import EpochSampler, TokenBin
from llmpipe.errors import DataError


class CountingEncoder:
    """Encodes a document "a b c" to fixed ids; enough to exercise the file format."""

    backend = "test"

    def __init__(self, eot: int, big: int = 0):
        self.eot, self.big = eot, big

    def encode_to_array(self, texts, dtype):
        ids = []
        for text in texts:
            ids += [self.big + len(word) for word in text.split()] + [self.eot]
        return np.asarray(ids, dtype=dtype)


class FirstDocumentsAreTrain:
    """A split by position (the documents repeat, so no split by text would do)."""

    def __init__(self, n_train):
        self.n_train, self.seen = n_train, 0

    def is_val(self, doc):
        self.seen += 1
        return self.seen > self.n_train


def make_corpus(tmp_path, vocab_size=1000, big=0, words=50):
    docs = [" ".join("x" * (1 + (i * j) % 9) for j in range(words)) for i in range(1, 20)]
    write_corpus(
        tmp_path,
        iter(docs),
        FirstDocumentsAreTrain(15),
        CountingEncoder(0, big),
        vocab_size,
        "test",
    )
    return tmp_path


def test_roundtrip_and_windows(tmp_path):
    corpus = make_corpus(tmp_path)
    train = TokenBin.open(corpus, "train", expected_vocab_size=1000, verify_checksum=True)
    assert train.tokens.dtype == np.uint16 and len(train) == 15 * 51
    x, y = train.batch([0, 5], 8)
    assert x.shape == (2, 8) and x.dtype == torch.int64
    # Document 1 has words of lengths 1, 2, ..., so its ids are 1, 2, ...
    assert x[0].tolist() == list(range(1, 9)) and y[0].tolist() == list(range(2, 10))
    assert x[1].tolist() == [6, 7, 8, 9, 1, 2, 3, 4]  # lengths cycle through 1..9
    val = TokenBin.open(corpus, "val")
    last = len(val) - 9
    assert val.eval_starts(8, 10) == [round(i * last / 9) for i in range(10)]


def test_the_selection_tail_is_whole_documents_cut_from_the_train_split(tmp_path):
    train = TokenBin.open(make_corpus(tmp_path), "train")  # 15 documents of 51 tokens
    head, tail = train.split_tail(0.1)  # 76.5 tokens: the tail starts at the next document
    assert len(head) + len(tail) == len(train)
    assert len(head) == 14 * 51 and len(tail) == 51
    assert head.tokens[-1] == train.eot_id  # no document on both sides
    assert np.array_equal(np.concatenate([head.tokens, tail.tokens]), train.tokens)
    assert tail.eval_starts(8, 4)[-1] + 9 <= len(tail)  # its windows stay inside it
    assert len(train.split_tail(0.01)[1]) == 0  # the last document already started: no tail
    # a cut on a document's first token keeps that document for the tail
    assert len(train.split_tail(2 / 15)[1]) == 2 * 51
    assert len(train.split_tail(2 / 15 + 1 / len(train))[1]) == 2 * 51  # on the end of text


def test_uint32_above_65536_tokens_of_vocabulary(tmp_path):
    corpus = make_corpus(tmp_path, vocab_size=70_000, big=69_000)
    train = TokenBin.open(corpus, "train")
    assert train.tokens.dtype == np.uint32
    assert int(train.tokens.max()) > 65_535


def test_truncated_bin_is_detected(tmp_path):
    corpus = make_corpus(tmp_path)
    data = (corpus / "train.bin").read_bytes()
    (corpus / "train.bin").write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"train\.bin: \d+ bytes, but meta\.json says \d+ tokens"):
        TokenBin.open(corpus, "train")


def test_wrong_meta_is_detected(tmp_path):
    corpus = make_corpus(tmp_path)
    with pytest.raises(
        DataError, match="vocabulary of 1000, but the model has a vocabulary of 50257"
    ):
        TokenBin.open(corpus, "train", expected_vocab_size=50257)
    meta = json.loads((corpus / "meta.json").read_text())
    meta["vocab_size"] = 100_000  # uint16 cannot hold it
    (corpus / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="dtype uint16 cannot hold a vocabulary of 100000"):
        TokenBin.open(corpus, "train")
    (corpus / "meta.json").write_text("{")
    with pytest.raises(DataError, match="meta.json: not valid JSON"):
        TokenBin.open(corpus, "train")


def test_changed_bin_fails_the_checksum(tmp_path):
    corpus = make_corpus(tmp_path)
    data = bytearray((corpus / "val.bin").read_bytes())
    data[0] ^= 1
    (corpus / "val.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256 differs from meta.json"):
        TokenBin.open(corpus, "val", verify_checksum=True)


class ReadsRecorded:
    """A memmap stand-in that records every slice read and refuses a read of the whole."""

    def __init__(self, tokens):
        self.tokens, self.reads = tokens, []

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, key):
        assert isinstance(key, slice), key
        self.reads.append(key.stop - key.start)
        return self.tokens[key]

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole memmap was read")


def test_training_windows_read_only_themselves(tmp_path):
    n = 20_000_000  # 40 MB of uint16
    np.arange(n, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {
                "dtype": "uint16",
                "vocab_size": 65536,
                "eot_id": 0,
                "splits": {"train": {"tokens": n, "documents": 1, "bytes": 0, "sha256": ""}},
            }
        )
    )
    bins = TokenBin.open(tmp_path, "train")
    spy = ReadsRecorded(bins.tokens)
    bins = dataclasses.replace(bins, tokens=spy)
    sampler = EpochSampler(bins, 1024, seed=0)
    for step in range(5):
        x, y = bins.batch(sampler.starts(16 * step, 16), 1024)
        assert x.shape == y.shape == (16, 1024)
    assert spy.reads == [1025] * 80  # each window and its next token, nothing else


def test_the_epoch_sampler_draws_every_window_once_an_epoch_and_resumes_in_order(tmp_path):
    corpus = make_corpus(tmp_path)
    train = TokenBin.open(corpus, "train")
    sampler = EpochSampler(train, 8, seed=3)
    assert sampler.windows == (len(train) - 1) // 8 == 95
    # Two and a half epochs drawn in uneven pieces, as steps of different sizes would.
    drawn, position = [], 0
    for count in [7, 40, 1, 95, 50, 44]:
        drawn += sampler.starts(position, count)
        position += count
    grid = [i * 8 for i in range(95)]
    first, second = drawn[:95], drawn[95:190]
    assert sorted(first) == sorted(second) == grid  # each window exactly once an epoch
    assert first != second and first != grid  # shuffled, and anew each epoch
    assert all(s + 9 <= len(train) for s in drawn)  # every window has its last target
    # A fresh sampler (a resumed run) continues mid-epoch in the same order; another seed
    # draws another order.
    assert EpochSampler(train, 8, seed=3).starts(150, 87) == drawn[150:237]
    assert EpochSampler(train, 8, seed=4).starts(0, 95) != first
    assert sampler.unique_windows(47) == 47 and sampler.unique_windows(237) == 95

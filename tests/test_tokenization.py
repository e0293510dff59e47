import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import SAMPLE_DOCS
from llmpipe.data.corpus import stdlib_reference
from llmpipe.data.tokenization import FastEncoder, split_by_document, train_bpe
from llmpipe.errors import DataError

CORPUS = SAMPLE_DOCS + stdlib_reference()[:20]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=600, min_frequency=2)


def test_roundtrip_on_corpus_samples(tokenizer):
    for text in CORPUS[:30]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer) == 600
    assert tokenizer.eos_token == "<|endoftext|>"


def test_saved_directory_reloads_and_encodes_identically(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:30]:
        assert reloaded(text).input_ids == tokenizer(text).input_ids
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_training_is_deterministic(tokenizer):
    again = train_bpe(CORPUS, vocab_size=600, min_frequency=2)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_fast_encoder_gives_the_tokenizers_ids(tokenizer):
    encoder = FastEncoder(tokenizer, sample=CORPUS[:10])
    assert encoder.backend == "tiktoken"
    flat = encoder.encode_to_array(CORPUS, np.dtype(np.uint16))
    expected = []
    for text in CORPUS:
        expected += tokenizer(text, add_special_tokens=False).input_ids + [encoder.eot]
    assert flat.tolist() == expected


def test_fast_encoder_falls_back_when_ids_differ(tokenizer, monkeypatch):
    import tiktoken

    import llmpipe.data.tokenization as tok

    real = tok._tiktoken_encoding

    def swapped_ranks(t):  # a fast path whose merges no longer match the tokenizer's
        enc = real(t)
        ranks = dict(enc._mergeable_ranks)
        a, b = sorted(ranks, key=ranks.get)[300:302]
        ranks[a], ranks[b] = ranks[b], ranks[a]
        return tiktoken.Encoding(
            name="swapped",
            pat_str=tok.GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=enc._special_tokens,
        )

    monkeypatch.setattr(tok, "_tiktoken_encoding", swapped_ranks)
    encoder = FastEncoder(tokenizer, sample=CORPUS)
    assert encoder.backend == "tokenizers"
    expected = []
    for text in CORPUS:
        expected += tokenizer(text, add_special_tokens=False).input_ids + [encoder.eot]
    assert encoder.encode_to_array(CORPUS, np.dtype(np.uint16)).tolist() == expected


def test_split_by_document_is_deterministic_and_disjoint():
    docs = [f"doc {i}" for i in range(100)] + ["duplicate"] * 5
    split = split_by_document(docs, 0.2, seed=1, corpus="c")
    assert split == split_by_document(docs, 0.2, seed=1, corpus="c")
    assert not set(split["train"]) & set(split["val"])
    assert len(split["train"]) + len(split["val"]) == len(docs)
    assert 15 <= len(set(split["val"])) <= 25
    assert split != split_by_document(docs, 0.2, seed=2, corpus="c")
    with pytest.raises(DataError, match="corpus c: 1 distinct document"):
        split_by_document(["same", "same"], 0.5, seed=1, corpus="c")


def todays_split(docs, val_fraction, seed):
    """The split before DocumentSplit: whole digests, the corpus in memory."""
    import hashlib

    def rank(text):
        return hashlib.sha256(f"{seed}\0{text}".encode()).digest()

    unique = sorted({rank(d) for d in docs})
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    val = set(unique[:n_val])
    return [d for d in docs if rank(d) not in val], [d for d in docs if rank(d) in val]


def test_the_streamed_split_is_the_in_memory_one():
    from llmpipe.data.corpus import stdlib_docstrings
    from llmpipe.data.tokenization import DocumentSplit

    docs = stdlib_docstrings()[:3000] * 2  # duplicates too
    for fraction, seed in ((0.1, 1337), (0.05, 7)):
        split = DocumentSplit.fit(iter(docs), fraction, seed, "c")
        train, val = todays_split(docs, fraction, seed)
        assert [d for d in docs if not split.is_val(d)] == train
        assert [d for d in docs if split.is_val(d)] == val


def test_the_split_threshold_is_the_n_th_distinct_rank(monkeypatch):
    """The in-place fit picks what np.unique's sorted distinct ranks gave, duplicates and
    the mask's blocks included."""
    import llmpipe.data.tokenization as tok

    mask = np.random.default_rng(0).random(10_000) < 0.3
    trues = np.flatnonzero(mask)
    for n in (1, 2, 777, len(trues)):
        assert tok._nth_true(mask, n, block=64) == trues[n - 1]
    with pytest.raises(IndexError):
        tok._nth_true(mask, len(trues) + 1, block=64)

    docs = [f"doc {i % 700}" for i in range(3000)]  # each text four or five times
    ranks = np.unique(np.array([tok._rank(5, d) for d in docs], dtype=np.uint64))
    real_nth_true = tok._nth_true
    monkeypatch.setattr(tok, "_nth_true", lambda m, n: real_nth_true(m, n, block=100))
    for fraction in (0.001, 0.1, 0.5, 0.999):
        n_val = min(max(1, round(fraction * len(ranks))), len(ranks) - 1)
        split = tok.DocumentSplit.fit(iter(docs), fraction, 5, "c")
        assert split.threshold == int(ranks[n_val - 1])


def test_two_worker_processes_write_the_bins_of_one(tokenizer, tmp_path):
    from llmpipe.data.corpus import stdlib_docstrings
    from llmpipe.data.tokenization import DocumentSplit, write_corpus

    docs = stdlib_docstrings()  # about 2 MB: a few chunks per process
    encoder = FastEncoder(tokenizer, sample=docs[:50])
    assert encoder.backend == "tiktoken"
    split = DocumentSplit.fit(iter(docs), 0.1, 0, "c")
    # chunks of 32 KB: about 60 of them, so two processes work under the in-flight bound
    metas = {
        n: write_corpus(
            tmp_path / str(n),
            iter(docs),
            split,
            encoder,
            len(tokenizer),
            "bpe",
            num_proc=n,
            chunk_chars=1 << 15,
        )
        for n in (1, 2)
    }
    assert metas[1] == metas[2]
    for name in ("train", "val"):
        one, two = ((tmp_path / f"{n}/{name}.bin").read_bytes() for n in (1, 2))
        assert one == two
    # and the same ids as encoding each document on its own
    train = [d for d in docs if not split.is_val(d)][:40]
    ids = np.fromfile(tmp_path / "2/train.bin", dtype=np.uint16)
    expected = [
        t
        for d in train
        for t in tokenizer(d, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    ]
    assert ids[: len(expected)].tolist() == expected

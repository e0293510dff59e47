import numpy as np
import pytest
from transformers import AutoTokenizer

from conftest import SAMPLE_DOCS
from llmpipe.corpus import stdlib_reference
from llmpipe.errors import DataError
from llmpipe.tokenization import FastEncoder, split_by_document, train_bpe

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

    import llmpipe.tokenization as tok

    real = tok._tiktoken_encoding

    def swapped_ranks(t):  # a fast path whose merges no longer match the tokenizer's
        enc = real(t)
        ranks = dict(enc._mergeable_ranks)
        a, b = sorted(ranks, key=ranks.get)[300:302]
        ranks[a], ranks[b] = ranks[b], ranks[a]
        return tiktoken.Encoding(name="swapped", pat_str=tok.GPT2_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=enc._special_tokens)

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

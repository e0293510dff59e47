"""Tokenizers: train a byte-level BPE or load a pretrained one, and encode corpora fast.

`FastEncoder` encodes with tiktoken when the tokenizer is a byte-level BPE (ours, or gpt2's):
tiktoken runs the same merges about 4-5x faster than `tokenizers`' `encode_batch`, in parallel
threads. It is checked against the Hugging Face tokenizer on a sample of the corpus
and falls back to `encode_batch` when the two disagree, so the ids are always the tokenizer's.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from llmpipe.data import bin_path, token_dtype, write_meta
from llmpipe.errors import DataError, ParamsError
from llmpipe.io import atomic_path, sha256_file

EOT = "<|endoftext|>"
# GPT-2's pre-tokenization regex, which byte-level BPE (tokenizers' ByteLevel) uses too.
GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def train_bpe(texts: Sequence[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE trained on `texts`, with <|endoftext|> as bos/eos/unk (as GPT-2)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 257:
        raise ParamsError(f"tokenize.vocab_size: {vocab_size} is too small for byte-level BPE "
                          "(256 bytes + <|endoftext|> need at least 258)")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                            special_tokens=[EOT], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOT,
                                   eos_token=EOT, unk_token=EOT)


def load_pretrained(spec: str, trust_remote_code: bool = False):
    """`hf:<name>` (a hub tokenizer) or a local tokenizer directory."""
    from transformers import AutoTokenizer

    name = spec.removeprefix("hf:")
    if not spec.startswith("hf:") and not Path(name).is_dir():
        raise DataError(f"tokenizer {spec!r}: no such directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer {spec!r}: cannot load ({e})") from e
    if tokenizer.eos_token_id is None:
        raise DataError(f"tokenizer {spec!r}: has no end-of-text (eos) token")
    return tokenizer


def eot_id(tokenizer) -> int:
    return int(tokenizer.eos_token_id)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for the 256 bytes (as in tokenizers' ByteLevel)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def _tiktoken_encoding(tokenizer):
    """A tiktoken Encoding with the tokenizer's byte-level BPE ranks, or None if it has none."""
    import json

    import tiktoken

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}
    # Exactly GPT-2's scheme: a plain ByteLevel pre-tokenizer with its regex, no prefix space,
    # no normalizer. Anything else (Llama-3's Split + ByteLevel, say) takes the slow path.
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel"
            or pre.get("add_prefix_space") or not pre.get("use_regex", True)
            or state.get("normalizer") is not None):
        return None
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    special = {t["content"] for t in state.get("added_tokens", [])}
    ranks = {}
    for token, token_id in model["vocab"].items():
        if token in special:
            continue
        try:
            ranks[bytes(byte_of[ch] for ch in token)] = token_id
        except KeyError:
            return None  # not a pure byte-level vocabulary
    return tiktoken.Encoding(name="llmpipe-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={tokenizer.eos_token: eot_id(tokenizer)})


class FastEncoder:
    """Encode documents to ids, each followed by the end-of-text id."""

    def __init__(self, tokenizer, sample: Sequence[str] = (), threads: int | None = None):
        """`sample`: documents on which the fast path must give the tokenizer's ids exactly
        (through the same glued path the corpus goes through), else it is not used."""
        self.tokenizer = tokenizer
        self.eot = eot_id(tokenizer)
        self.threads = threads or os.cpu_count() or 1
        self.tiktoken = _tiktoken_encoding(tokenizer)
        if self.tiktoken is not None and sample:
            dtype = np.dtype(np.uint32)
            if not np.array_equal(self._fast(list(sample), dtype), self._slow(list(sample), dtype)):
                self.tiktoken = None

    @property
    def backend(self) -> str:
        return "tiktoken" if self.tiktoken is not None else "tokenizers"

    def encode_to_array(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        """One flat array: doc0 ids, eot, doc1 ids, eot, ..."""
        return self._fast(texts, dtype) if self.tiktoken is not None else self._slow(texts, dtype)

    def _fast(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        # Many small documents cost more in per-call overhead than in BPE: glue them into
        # pieces of ~128 K characters with the end-of-text token between them. tiktoken splits
        # on the special token before pre-tokenizing, so the ids equal per-document encoding +
        # eot. encode_to_numpy skips the Python list and releases the GIL: one piece a thread.
        from concurrent.futures import ThreadPoolExecutor

        eos = self.tokenizer.eos_token
        pieces = ["".join(doc + eos for doc in group) for group in chunks(texts, 1 << 17)]
        with ThreadPoolExecutor(self.threads) as pool:
            encoded = list(pool.map(
                lambda piece: self.tiktoken.encode_to_numpy(piece, allowed_special={eos}),
                pieces))
        return np.concatenate(encoded).astype(dtype, copy=False)

    def _slow(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        encoded = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids + [self.eot], dtype=dtype) for e in encoded])


def split_by_document(docs: Sequence[str], val_fraction: float, seed: int,
                      corpus: str) -> dict[str, list[str]]:
    """Deterministic train/val split by documents.

    Documents are ranked by a seeded hash of their text and the lowest ranked fraction goes
    to val. Identical texts share a hash, so a duplicated document can never land on both sides.
    """
    def rank(text: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{text}".encode()).digest()

    unique = sorted({rank(d) for d in docs})
    if len(unique) < 2:
        raise DataError(f"corpus {corpus}: {len(unique)} distinct document(s); a train/val "
                        "split needs at least 2")
    n_val = min(max(1, round(val_fraction * len(unique))), len(unique) - 1)
    val_ranks = set(unique[:n_val])
    split: dict[str, list[str]] = {"train": [], "val": []}
    for doc in docs:
        split["val" if rank(doc) in val_ranks else "train"].append(doc)
    return split


def chunks(docs: Sequence[str], max_chars: int = 1 << 20) -> Iterator[list[str]]:
    """Consecutive groups of documents of about `max_chars` characters."""
    group: list[str] = []
    size = 0
    for doc in docs:
        group.append(doc)
        size += len(doc)
        if size >= max_chars:
            yield group
            group, size = [], 0
    if group:
        yield group


def spread_sample(docs: Sequence[str], count: int) -> list[str]:
    """`count` documents spread evenly over `docs` (not just its first ones)."""
    step = max(len(docs) // count, 1)
    return list(docs[::step][:count])


def write_corpus(out_dir: str | Path, splits: dict[str, list[str]], encoder, vocab_size: int,
                 tokenizer_name: str, progress_desc: str = "") -> dict:
    """Encode each split's documents into a token memmap (`llmpipe.data`'s format):
    out_dir/<split>.bin, then meta.json beside.

    Encodes and writes chunk by chunk, so the token arrays never all sit in memory. Returns meta.
    """
    from tqdm import tqdm

    from llmpipe.corpus import text_bytes

    dtype = token_dtype(vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": encoder.eot,
            "tokenizer": tokenizer_name, "encoder": encoder.backend, "splits": {}}
    total_bytes = sum(text_bytes(docs) for docs in splits.values())
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=progress_desc) as bar:
        for split, docs in splits.items():
            n_tokens = 0
            path = bin_path(out_dir, split)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                for group in chunks(docs):
                    ids = encoder.encode_to_array(group, dtype)
                    ids.tofile(f)
                    n_tokens += len(ids)
                    bar.update(text_bytes(group))
            meta["splits"][split] = {"documents": len(docs), "tokens": n_tokens,
                                     "bytes": text_bytes(docs), "sha256": sha256_file(path)}
    write_meta(out_dir, meta)
    return meta

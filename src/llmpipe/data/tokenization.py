"""Tokenizers: train a byte-level BPE or load a pretrained one, and encode corpora fast.

`FastEncoder` encodes with tiktoken when the tokenizer is a byte-level BPE (ours, or gpt2's):
tiktoken runs the same merges about 4-5x faster than `tokenizers`' `encode_batch`, in parallel
threads. It is checked against the Hugging Face tokenizer on a sample of the corpus
and falls back to `encode_batch` when the two disagree, so the ids are always the tokenizer's.
"""

from __future__ import annotations

import copy
import hashlib
import heapq
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmpipe.data.tokens import bin_path, token_dtype, write_meta
from llmpipe.errors import DataError, ParamsError
from llmpipe.io import atomic_path, sha256_file

EOT = "<|endoftext|>"
# GPT-2's pre-tokenization regex, which byte-level BPE (tokenizers' ByteLevel) uses too.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int):
    """A byte-level BPE trained on `texts`, with <|endoftext|> as bos/eos/unk (as GPT-2)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    if vocab_size <= 257:
        raise ParamsError(
            f"tokenize.vocab_size: {vocab_size} is too small for byte-level BPE "
            "(256 bytes + <|endoftext|> need at least 258)"
        )
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )


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
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
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
    if (
        model.get("type") != "BPE"
        or pre.get("type") != "ByteLevel"
        or pre.get("add_prefix_space")
        or not pre.get("use_regex", True)
        or state.get("normalizer") is not None
    ):
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
    return tiktoken.Encoding(
        name="llmpipe-bpe",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={tokenizer.eos_token: eot_id(tokenizer)},
    )


class FastEncoder:
    """Encode documents to ids, each followed by the end-of-text id. It keeps the `tokenizers`
    backend and the tiktoken encoding only (no transformers object): the encoding worker
    processes inherit it."""

    def __init__(self, tokenizer, sample: Sequence[str] = (), threads: int | None = None):
        """`sample`: documents on which the fast path must give the tokenizer's ids exactly
        (through the same glued path the corpus goes through), else it is not used."""
        self.backend_tokenizer = tokenizer.backend_tokenizer
        self.eos = tokenizer.eos_token
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

        eos = self.eos
        pieces = ["".join(doc + eos for doc in group) for group in chunks(texts, 1 << 17)]
        with ThreadPoolExecutor(self.threads) as pool:
            encoded = list(
                pool.map(
                    lambda piece: self.tiktoken.encode_to_numpy(piece, allowed_special={eos}),
                    pieces,
                )
            )
        return np.concatenate(encoded).astype(dtype, copy=False)

    def _slow(self, texts: list[str], dtype: np.dtype) -> np.ndarray:
        encoded = self.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids + [self.eot], dtype=dtype) for e in encoded])


@dataclass(frozen=True)
class DocumentSplit:
    """Deterministic train/val split by documents.

    Documents are ranked by a seeded hash of their text and the lowest ranked fraction of the
    distinct documents goes to val. Identical texts share a hash, so a duplicated document can
    never land on both sides. Fitting streams the corpus once and keeps 8 bytes per document
    (the hash's leading bytes, which order the documents as the whole hash does), and one
    more while it counts the distinct ones.
    """

    seed: int
    threshold: int  # a document is val when its rank is at most this

    def rank(self, text: str) -> int:
        return _rank(self.seed, text)

    def is_val(self, text: str) -> bool:
        return self.rank(text) <= self.threshold

    @classmethod
    def fit(cls, docs: Iterable[str], val_fraction: float, seed: int, corpus: str) -> DocumentSplit:
        ranks = np.fromiter((_rank(seed, d) for d in docs), dtype=np.uint64)
        # Sorted in place, and the distinct ranks marked in a mask of a byte a document:
        # np.unique held a sorted copy, the distinct ranks and its own temporaries beside
        # them, 65 bytes a document at the peak (124 MB for 1.9M documents, against 18 MB).
        ranks.sort()
        starts = np.ones(len(ranks), dtype=bool)  # where each distinct rank starts
        np.not_equal(ranks[1:], ranks[:-1], out=starts[1:])
        n_distinct = int(np.count_nonzero(starts))
        if n_distinct < 2:
            raise DataError(
                f"corpus {corpus}: {n_distinct} distinct document(s); a train/val "
                "split needs at least 2"
            )
        n_val = min(max(1, round(val_fraction * n_distinct)), n_distinct - 1)
        return cls(seed, int(ranks[_nth_true(starts, n_val)]))


def _rank(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode()).digest()[:8], "big")


def _nth_true(mask: np.ndarray, n: int, block: int = 1 << 20) -> int:
    """The index of the n-th (from 1) True of `mask`, block by block (np.flatnonzero of the
    whole mask would take 8 bytes per True)."""
    left = n  # Trues still to pass
    for start in range(0, len(mask), block):
        part = mask[start : start + block]
        count = int(np.count_nonzero(part))
        if left <= count:
            return start + int(np.flatnonzero(part)[left - 1])
        left -= count
    raise IndexError(f"the mask has fewer than {n} True values")


def split_by_document(
    docs: Sequence[str], val_fraction: float, seed: int, corpus: str
) -> dict[str, list[str]]:
    """`docs` split in memory by DocumentSplit (for small sets: preference prompts)."""
    split_rule = DocumentSplit.fit(docs, val_fraction, seed, corpus)
    split: dict[str, list[str]] = {"train": [], "val": []}
    for doc in docs:
        split["val" if split_rule.is_val(doc) else "train"].append(doc)
    return split


CHUNK_CHARS = 1 << 20  # the unit of work of an encoding process


def chunks(docs: Iterable[str], max_chars: int = CHUNK_CHARS) -> Iterator[list[str]]:
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


class SpreadSample:
    """`size` documents spread over a whole stream (those with the smallest hash), gathered
    while the stream passes by: what the fast encoder is checked on."""

    def __init__(self, size: int):
        self.size, self._heap = size, []

    def watch(self, docs: Iterable[str]) -> Iterator[str]:
        for doc in docs:
            key = -int.from_bytes(hashlib.sha256(doc.encode()).digest()[:8], "big")
            if len(self._heap) < self.size:
                heapq.heappush(self._heap, (key, doc))
            elif key > self._heap[0][0]:
                heapq.heapreplace(self._heap, (key, doc))
            yield doc

    @property
    def documents(self) -> list[str]:
        return [doc for _, doc in sorted(self._heap, reverse=True)]


@dataclass(frozen=True)
class _ChunkEncoder:
    """What an encoding worker needs: the encoder, the split and the dtype (picklable)."""

    encoder: FastEncoder
    split: DocumentSplit
    dtype: np.dtype

    def __call__(self, docs: list[str]) -> dict[str, tuple[np.ndarray, int, int]]:
        """split -> (ids, documents, bytes) of one chunk of documents."""
        parts: dict[str, list[str]] = {"train": [], "val": []}
        for doc in docs:
            parts["val" if self.split.is_val(doc) else "train"].append(doc)
        return {
            name: (
                self.encoder.encode_to_array(texts, self.dtype)
                if texts
                else np.zeros(0, self.dtype),
                len(texts),
                sum(len(t.encode("utf-8")) for t in texts),
            )
            for name, texts in parts.items()
        }


_worker_job: _ChunkEncoder | None = None


def _start_worker(job: _ChunkEncoder) -> None:
    global _worker_job
    _worker_job = job


def _run_worker(docs: list[str]):
    return _worker_job(docs)


def _encoded_chunks(
    job: _ChunkEncoder, docs: Iterable[str], num_proc: int, chunk_chars: int
) -> Iterator:
    """job(chunk) for consecutive chunks of `docs`, in order, on `num_proc` processes, with at
    most two chunks per process in flight: memory does not grow with the corpus."""
    groups = chunks(docs, chunk_chars)
    if num_proc == 1:
        yield from map(job, groups)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # The parent used tokenizers' threads (training, the encoder check): forked workers
    # would each warn that they turn them off.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # fork: the workers inherit the encoder instead of importing and rebuilding it. A worker
    # that dies (the OOM killer) raises BrokenProcessPool here rather than hanging.
    with ProcessPoolExecutor(
        num_proc, multiprocessing.get_context("fork"), _start_worker, (job,)
    ) as pool:
        pending: deque = deque()
        for group in groups:
            pending.append(pool.submit(_run_worker, group))
            if len(pending) >= 2 * num_proc:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def write_corpus(
    out_dir: str | Path,
    docs: Iterable[str],
    split: DocumentSplit,
    encoder,
    vocab_size: int,
    tokenizer_name: str,
    num_proc: int = 1,
    progress_desc: str = "",
    chunk_chars: int = CHUNK_CHARS,
) -> dict:
    """Encode a stream of documents into the token memmaps of `llmpipe.data.tokens`'s format:
    out_dir/train.bin and val.bin, filled chunk by chunk in corpus order (each split's ids are
    those of its documents, in order), then meta.json. Returns meta."""
    from tqdm import tqdm

    dtype = token_dtype(vocab_size)
    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eot_id": encoder.eot,
        "tokenizer": tokenizer_name,
        "encoder": encoder.backend,
        "splits": {},
    }
    counts = {name: {"documents": 0, "tokens": 0, "bytes": 0} for name in ("train", "val")}
    encoder = copy.copy(encoder)
    encoder.threads = 1  # one thread per process: the processes are the parallelism
    job = _ChunkEncoder(encoder, split, dtype)
    with (
        atomic_path(bin_path(out_dir, "train")) as train_tmp,
        atomic_path(bin_path(out_dir, "val")) as val_tmp,
        open(train_tmp, "wb") as train_file,
        open(val_tmp, "wb") as val_file,
        tqdm(unit="B", unit_scale=True, desc=progress_desc) as bar,
    ):
        files = {"train": train_file, "val": val_file}
        for encoded in _encoded_chunks(job, docs, num_proc, chunk_chars):
            for name, (ids, documents, n_bytes) in encoded.items():
                ids.tofile(files[name])
                for key, value in (
                    ("documents", documents),
                    ("tokens", len(ids)),
                    ("bytes", n_bytes),
                ):
                    counts[name][key] += value
                bar.update(n_bytes)
    for name in ("train", "val"):
        meta["splits"][name] = {**counts[name], "sha256": sha256_file(bin_path(out_dir, name))}
    write_meta(out_dir, meta)
    return meta

"""Token memmaps: the flat train.bin / val.bin files the tokenize stage writes, and the
training and evaluation windows the models read from them.

Layout of one corpus directory (e.g. data/tokens/pretrain/):
    train.bin, val.bin   flat token ids, documents separated by the end-of-text id
    meta.json            dtype, vocab_size, eot_id, tokenizer, and per split: tokens,
                         documents, sha256
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from llmpipe.errors import DataError
from llmpipe.io import sha256_file, write_json


@dataclass(frozen=True)
class TokenBin:
    """One split of a tokenized corpus, memory-mapped read-only and checked against meta.json."""

    path: Path
    tokens: np.memmap
    vocab_size: int
    eot_id: int

    @classmethod
    def open(
        cls,
        corpus_dir: str | Path,
        split: str,
        expected_vocab_size: int | None = None,
        verify_checksum: bool = False,
    ) -> TokenBin:
        corpus_dir = Path(corpus_dir)
        meta = read_meta(corpus_dir)
        path = bin_path(corpus_dir, split)
        info = meta["splits"].get(split)
        if info is None:
            raise DataError(f"{corpus_dir / 'meta.json'}: no split {split!r}")
        if not path.exists():
            raise DataError(f"{path}: not found")
        dtype = np.dtype(meta["dtype"])
        if meta["vocab_size"] > np.iinfo(dtype).max + 1:
            raise DataError(
                f"{corpus_dir / 'meta.json'}: dtype {dtype} cannot hold a "
                f"vocabulary of {meta['vocab_size']}"
            )
        expected_bytes = info["tokens"] * dtype.itemsize
        actual_bytes = path.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(
                f"{path}: {actual_bytes} bytes, but meta.json says {info['tokens']} tokens of "
                f"{dtype} = {expected_bytes} bytes (truncated or rewritten; rerun tokenize)"
            )
        if expected_vocab_size is not None and meta["vocab_size"] != expected_vocab_size:
            raise DataError(
                f"{path}: tokens from a vocabulary of {meta['vocab_size']}, but the model has a "
                f"vocabulary of {expected_vocab_size} (tokenizer and model do not match)"
            )
        if verify_checksum and sha256_file(path) != info["sha256"]:
            raise DataError(f"{path}: sha256 differs from meta.json (file changed; rerun tokenize)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        return cls(path, tokens, meta["vocab_size"], meta["eot_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def documents(self) -> Iterator[np.ndarray]:
        """Each document's token ids, without its end-of-text token."""
        tokens = np.asarray(self.tokens)
        bounds = np.flatnonzero(tokens == self.eot_id)
        starts = np.concatenate([[0], bounds + 1])[: len(bounds)]
        for start, end in zip(starts, bounds, strict=True):
            yield tokens[start:end]

    def split_tail(self, fraction: float) -> tuple[TokenBin, TokenBin]:
        """(head, tail): the split cut where the first document to start in its last
        `fraction` of tokens starts, so that no document is on both sides (a tail without a
        document start is empty). The documents are in corpus order: the tail is the split's
        last documents, not a random draw of them."""
        cut = max(int(len(self) * (1 - fraction)), 1)
        # A document starts after an end of text: look from the token before the cut.
        ends = np.flatnonzero(np.asarray(self.tokens[cut - 1 :]) == self.eot_id)
        start = cut + int(ends[0]) if len(ends) else len(self)
        return replace(self, tokens=self.tokens[:start]), replace(self, tokens=self.tokens[start:])

    def check_block(self, block_size: int) -> None:
        if len(self) < block_size + 1:
            raise DataError(
                f"{self.path}: {len(self)} tokens, fewer than one window of "
                f"block_size + 1 = {block_size + 1}"
            )

    def window(self, start: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[start : start + block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def batch(self, starts: list[int], block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (len(starts), block_size) int64."""
        xs, ys = zip(*(self.window(s, block_size) for s in starts), strict=True)
        return torch.stack(xs), torch.stack(ys)

    def eval_starts(self, block_size: int, count: int) -> list[int]:
        """A fixed set of evaluation windows, spread evenly over the split.

        They may overlap when the split is short: every model is scored on the same ones.
        """
        self.check_block(block_size)
        last = len(self) - block_size - 1
        return sorted({round(i * last / max(count - 1, 1)) for i in range(count)})

    def eval_batches(self, block_size: int, count: int, batch_size: int):
        starts = self.eval_starts(block_size, count)
        for i in range(0, len(starts), batch_size):
            yield self.batch(starts[i : i + batch_size], block_size)


class EpochSampler:
    """Training windows without replacement: the split cut into back-to-back windows of
    block_size + 1 tokens (each overlapping the next by the one token that is only a target),
    every window drawn once per epoch, in an order shuffled anew each epoch from (seed, epoch).

    nanoGPT draws random starts with replacement: over N draws from M windows only about
    1 - e^(-N/M) of them are ever seen (at the GPU preset's 0.77 passes, 54% of the tokens).
    Here N draws see min(N, M) windows. The data position is one integer, the windows drawn
    so far: a resumed run, on any number of processes, continues mid-epoch in the same order.
    """

    def __init__(self, bins: TokenBin, block_size: int, seed: int):
        bins.check_block(block_size)
        self.block_size, self.seed = block_size, seed
        self.windows = (len(bins) - 1) // block_size  # window i: tokens [i*T, (i+1)*T + 1)
        self._epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of one epoch, shuffled from (seed, epoch)."""
        if epoch != self._epoch:  # one epoch's order in memory: 8 bytes a window
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._order = epoch, rng.permutation(self.windows)
        return self._order

    def starts(self, position: int, count: int) -> list[int]:
        """The starts of the `count` windows drawn after the first `position`."""
        starts: list[int] = []
        while len(starts) < count:
            epoch, index = divmod(position, self.windows)
            take = min(count - len(starts), self.windows - index)
            starts += (self.order(epoch)[index : index + take] * self.block_size).tolist()
            position += take
        return starts

    def unique_windows(self, position: int) -> int:
        """How many different windows the first `position` draws cover."""
        return min(position, self.windows)


META_FILE = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def bin_path(corpus_dir: str | Path, split: str) -> Path:
    return Path(corpus_dir) / f"{split}.bin"


def write_meta(corpus_dir: str | Path, meta: dict) -> None:
    """meta.json, written last (atomically): a corpus directory without it is unfinished."""
    write_json(Path(corpus_dir) / META_FILE, meta)


def read_meta(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / META_FILE
    if not path.exists():
        raise DataError(f"{path}: not found (run the tokenize stage first)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e.msg})") from e
    for key in ("dtype", "vocab_size", "eot_id", "splits"):
        if key not in meta:
            raise DataError(f"{path}: missing key {key!r}")
    try:
        np.dtype(meta["dtype"])
    except TypeError as e:
        raise DataError(f"{path}: unknown dtype {meta['dtype']!r}") from e
    return meta


UNIGRAM_FIT_TOKENS = 1 << 27  # 134M: plenty for token frequencies, a bounded read at any scale
COUNT_CHUNK = 1 << 22  # bincount converts to int64: counted chunk by chunk, 32 MB at a time


def unigram_perplexity(train: TokenBin, val_windows: list[torch.Tensor]) -> float:
    """Perplexity of a unigram model fit on train (add-one smoothed; its first
    UNIGRAM_FIT_TOKENS tokens) on the given targets: the baseline a language model must beat
    to have learned anything beyond token counts."""
    counts = np.zeros(train.vocab_size, dtype=np.float64)
    for start in range(0, min(len(train), UNIGRAM_FIT_TOKENS), COUNT_CHUNK):
        counts += np.bincount(
            train.tokens[start : min(start + COUNT_CHUNK, UNIGRAM_FIT_TOKENS)],
            minlength=train.vocab_size,
        )
    log_probs = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    targets = torch.cat([w.flatten() for w in val_windows]).numpy()
    return float(np.exp(-log_probs[targets].mean()))

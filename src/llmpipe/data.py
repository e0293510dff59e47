"""Token memmaps: the flat train.bin / val.bin files the tokenize stage writes, and the
training and evaluation windows the models read from them.

Layout of one corpus directory (e.g. data/tokens/pretrain/):
    train.bin, val.bin   flat token ids, documents separated by the end-of-text id
    meta.json            dtype, vocab_size, eot_id, tokenizer, and per split: tokens,
                         documents, sha256
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmpipe.errors import DataError
from llmpipe.io import sha256_file


@dataclass(frozen=True)
class TokenBin:
    """One split of a tokenized corpus, memory-mapped read-only and checked against meta.json."""

    path: Path
    tokens: np.memmap
    vocab_size: int
    eot_id: int

    @classmethod
    def open(cls, corpus_dir: str | Path, split: str, expected_vocab_size: int | None = None,
             verify_checksum: bool = False) -> TokenBin:
        corpus_dir = Path(corpus_dir)
        meta = read_meta(corpus_dir)
        path = corpus_dir / f"{split}.bin"
        info = meta["splits"].get(split)
        if info is None:
            raise DataError(f"{corpus_dir / 'meta.json'}: no split {split!r}")
        if not path.exists():
            raise DataError(f"{path}: not found")
        dtype = np.dtype(meta["dtype"])
        if meta["vocab_size"] > np.iinfo(dtype).max + 1:
            raise DataError(f"{corpus_dir / 'meta.json'}: dtype {dtype} cannot hold a "
                            f"vocabulary of {meta['vocab_size']}")
        expected_bytes = info["tokens"] * dtype.itemsize
        actual_bytes = path.stat().st_size
        if actual_bytes != expected_bytes:
            raise DataError(
                f"{path}: {actual_bytes} bytes, but meta.json says {info['tokens']} tokens of "
                f"{dtype} = {expected_bytes} bytes (truncated or rewritten; rerun tokenize)")
        if expected_vocab_size is not None and meta["vocab_size"] != expected_vocab_size:
            raise DataError(
                f"{path}: tokens from a vocabulary of {meta['vocab_size']}, but the model has a "
                f"vocabulary of {expected_vocab_size} (tokenizer and model do not match)")
        if verify_checksum and sha256_file(path) != info["sha256"]:
            raise DataError(f"{path}: sha256 differs from meta.json (file changed; rerun tokenize)")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        return cls(path, tokens, meta["vocab_size"], meta["eot_id"])

    def __len__(self) -> int:
        return len(self.tokens)

    def check_block(self, block_size: int) -> None:
        if len(self) < block_size + 1:
            raise DataError(f"{self.path}: {len(self)} tokens, fewer than one window of "
                            f"block_size + 1 = {block_size + 1}")

    def window(self, start: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = torch.from_numpy(self.tokens[start:start + block_size + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def random_starts(self, count: int, block_size: int,
                      generator: torch.Generator) -> list[int]:
        """nanoGPT-style random window starts; the generator's state is the data position."""
        self.check_block(block_size)
        return torch.randint(len(self) - block_size, (count,), generator=generator).tolist()

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
            yield self.batch(starts[i:i + batch_size], block_size)


def read_meta(corpus_dir: str | Path) -> dict:
    path = Path(corpus_dir) / "meta.json"
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


def unigram_perplexity(train: TokenBin, val_windows: list[torch.Tensor]) -> float:
    """Perplexity of a unigram model fit on train (add-one smoothed) on the given targets:
    the baseline a language model must beat to have learned anything beyond token counts."""
    counts = np.bincount(np.asarray(train.tokens), minlength=train.vocab_size).astype(np.float64)
    log_probs = np.log((counts + 1) / (counts.sum() + train.vocab_size))
    targets = torch.cat([w.flatten() for w in val_windows]).numpy()
    return float(np.exp(-log_probs[targets].mean()))


def write_corpus(out_dir: str | Path, splits: dict[str, list[str]], encoder, vocab_size: int,
                 tokenizer_name: str, progress_desc: str = "") -> dict:
    """Encode each split's documents into out_dir/<split>.bin and write meta.json beside.

    Encodes and writes chunk by chunk, so the token arrays never all sit in memory. Returns meta.
    """
    from tqdm import tqdm

    from llmpipe.corpus import text_bytes
    from llmpipe.io import atomic_path, write_json
    from llmpipe.tokenization import chunks, token_dtype

    out_dir = Path(out_dir)
    dtype = token_dtype(vocab_size)
    meta = {"dtype": dtype.name, "vocab_size": vocab_size, "eot_id": encoder.eot,
            "tokenizer": tokenizer_name, "encoder": encoder.backend, "splits": {}}
    total_bytes = sum(text_bytes(docs) for docs in splits.values())
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=progress_desc) as bar:
        for split, docs in splits.items():
            n_tokens = 0
            with atomic_path(out_dir / f"{split}.bin") as tmp, open(tmp, "wb") as f:
                for group in chunks(docs):
                    ids = encoder.encode_to_array(group, dtype)
                    ids.tofile(f)
                    n_tokens += len(ids)
                    bar.update(text_bytes(group))
            meta["splits"][split] = {"documents": len(docs), "tokens": n_tokens,
                                     "bytes": text_bytes(docs),
                                     "sha256": sha256_file(out_dir / f"{split}.bin")}
    write_json(out_dir / "meta.json", meta)
    return meta

"""The params schema of the data stages (download, tokenize).

The rules every schema follows, and the shared keys: llmpipe.params."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from llmpipe.params import (
    CORPUS_SOURCE,
    OPEN_UNIT_INTERVAL,
    POSITIVE_INT,
    SHA256,
    TOKENIZER_SOURCE,
    param,
)


@dataclass(frozen=True, kw_only=True)
class CorpusParams:
    source: str = param(CORPUS_SOURCE)
    split: str  # hf: datasets only
    text_column: str  # hf:, file: .jsonl and .parquet
    sha256: str | None = param(SHA256)  # required for url:, optional for file:
    data_files: list[str] | None  # hf: the files to read (glob patterns), e.g. parquet shards
    max_documents: int | None = param(POSITIVE_INT)  # caps, for a sample of a large corpus
    max_bytes: int | None = param(POSITIVE_INT)

    def cross_field_problems(self) -> list[tuple[str, str]]:
        if self.data_files is not None and not self.source.startswith("hf:"):
            return [
                (
                    "data_files",
                    f"{self.data_files} applies to hf: sources only (file: takes "
                    "a glob in its path)",
                )
            ]
        return []


@dataclass(frozen=True, kw_only=True)
class DownloadParams:
    SECTION: ClassVar[str] = "download"
    pretrain: CorpusParams
    finetune: CorpusParams


@dataclass(frozen=True, kw_only=True)
class TokenizeParams:
    SECTION: ClassVar[str] = "tokenize"
    tokenizer: str = param(TOKENIZER_SOURCE)
    vocab_size: int = param(POSITIVE_INT)  # bpe only; a pretrained tokenizer has its own
    min_frequency: int = param(POSITIVE_INT)
    val_fraction: float = param(OPEN_UNIT_INTERVAL)
    train_bytes: int | None = param(POSITIVE_INT)  # bpe: train on at most this much text
    num_proc: int | None = param(POSITIVE_INT)  # encoding processes; None: one per core
    trust_remote_code: bool

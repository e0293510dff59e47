"""Atomic file and directory writes, checksums and metrics files.

Every output of a stage goes through these helpers, so a crash never leaves a half-written
file where DVC or the next stage would take it for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmpipe import layout

# Metrics are rounded here, once, as they are written: figures to 4 decimals (losses to 6),
# timings (under "perf", or a rate named *_per_s) to 4 significant digits: they vary +-25% run
# to run, more digits are noise.
DECIMALS, LOSS_DECIMALS, PERF_DIGITS = 4, 6, 4


# The process's umask, read once: reading it means setting it for a moment, which another thread
# creating a file then would see (pretrain writes checkpoints on a background thread).
_UMASK = os.umask(0)
os.umask(_UMASK)


def _chmod_default(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; outputs get the usual umask."""
    os.chmod(path, mode & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    _chmod_default(tmp_path, 0o666)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)  # the rename itself must survive a power loss
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces `path` as a whole on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    _chmod_default(tmp, 0o777)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)  # put the previous output back
            raise
        _fsync(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """The temporaries that an atomic write of `path` killed half way left beside it."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        # allow_nan=False: NaN is not JSON, and DVC could not read the metrics file.
        tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL file; a missing file or a bad line is a DataError naming it."""
    from llmpipe.errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found (run the stage that writes it first)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
    return rows


def rounded(value: Any, key: str = "", perf: bool = False) -> Any:
    """`value` with every float rounded by the rule above (nested dicts and lists too)."""
    if isinstance(value, dict):
        return {
            k: rounded(v, str(k), perf or k == "perf" or str(k).endswith("_per_s"))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [rounded(v, key, perf) for v in value]
    if not isinstance(value, float):
        return value
    if perf:
        return float(f"{value:.{PERF_DIGITS}g}")
    return round(value, LOSS_DECIMALS if key.endswith("_loss") else DECIMALS)


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    """Write metrics/<stage>.json, rounded. Timing figures go under the key "perf": everything
    else is a deterministic function of params, seed and data (bit for bit on CPU)."""
    path = layout.metrics_file(stage)
    write_json(path, rounded(metrics))
    return path


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()

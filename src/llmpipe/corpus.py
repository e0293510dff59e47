"""Text corpora: where documents come from, and the JSONL files the pipeline keeps them in.

A corpus is a list of documents, each a record with a `text` field. Sources:
- `stdlib:docstrings`: the docstrings of Python's standard library, read by parsing its source
  with `ast` (importing modules would run their side effects), deduplicated, in sorted order;
- `stdlib:reference`: the language-reference topics shipped in `pydoc_data.topics`;
- `hf:<dataset>[:<config>]`: `datasets.load_dataset` (a hub name on a GPU box, or a local
  dataset directory / data file);
- `url:<address>`: a text file fetched over HTTP(S) and checked against its sha256;
- `file:<path>`: a local .txt (paragraphs split on blank lines), .jsonl or .parquet.
"""

from __future__ import annotations

import ast
import hashlib
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from pathlib import Path

from llmpipe.errors import DataError
from llmpipe.io import read_jsonl, sha256_file, write_jsonl
from llmpipe.params import CorpusParams

# Test suites are code about code, not documentation; site-packages is not the stdlib.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in stdlib.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(stdlib).parts)
    )
    docs: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few files are templates or Python 2 fixtures
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef |
                          ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip():
                    docs.add(doc.strip())
    return sorted(docs)


def stdlib_reference() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]


def text_bytes(docs: Iterable[str]) -> int:
    """UTF-8 size of documents (what MB/s and bytes-per-token figures count)."""
    return sum(len(doc.encode("utf-8")) for doc in docs)


def _split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str,
                    hint: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source}: no column {', '.join(repr(c) for c in missing)} "
                        f"(columns: {', '.join(columns) or 'none'}); {hint}")


def _column(records: Iterable[dict], columns: list[str], column: str, source: str) -> list[str]:
    require_columns(columns, [column], source, "set download.<corpus>.text_column")
    texts = []
    for i, record in enumerate(records):
        value = record[column]
        if not isinstance(value, str):
            raise DataError(f"{source}: row {i} column {column!r} is {type(value).__name__}, "
                            "not text")
        if value.strip():
            texts.append(value)
    return texts


def load_records(source: str, split: str = "train") -> tuple[list[dict], list[str]]:
    """Rows and column names of a tabular source: `hf:<dataset>[:<config>]` (a hub name, a
    dataset directory or a data file) or `file:<path>` (.jsonl or .parquet)."""
    scheme, _, rest = source.partition(":")
    if scheme == "file":
        path = Path(rest)
        if not path.exists():
            raise DataError(f"{source}: file not found")
        if path.suffix.lower() == ".jsonl":
            records = read_jsonl(path)
            return records, sorted(set().union(*(r.keys() for r in records))) if records else []
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return table.to_pylist(), table.column_names
        raise DataError(f"{source}: unsupported file type {path.suffix!r} (use .txt, .jsonl or "
                        ".parquet)")
    if scheme != "hf":
        raise DataError(f"{source}: not a tabular source (use hf: or file:)")
    import datasets

    name, _, config = rest.partition(":")
    local = Path(name)
    try:
        if local.is_file():  # a single local data file: let datasets pick the builder
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet",
                       ".csv": "csv", ".txt": "text"}.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{source}: unsupported data file type {local.suffix!r}")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        else:
            ds = datasets.load_dataset(name, config or None, split=split)
    except DataError:
        raise
    except (FileNotFoundError, ConnectionError, ValueError, OSError) as e:
        raise DataError(f"{source}: cannot load dataset ({type(e).__name__}: {e})") from e
    return ds.to_list(), list(ds.column_names)


def url_text(url: str, expected_sha256: str | None, source: str) -> list[str]:
    if expected_sha256 is None:
        raise DataError(f"{source}: a url: source needs download.<corpus>.sha256 "
                        "(the expected checksum of the file)")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            payload = response.read()
    except (urllib.error.URLError, TimeoutError, ValueError) as e:
        raise DataError(f"{source}: unreachable ({e})") from e
    return _checked_text(payload, expected_sha256, source)


def check_sha256(actual: str, expected: str, source: str) -> None:
    if actual != expected.lower():
        raise DataError(f"{source}: checksum mismatch: expected sha256 {expected}, got {actual}")


def _checked_text(payload: bytes, expected_sha256: str, source: str) -> list[str]:
    check_sha256(hashlib.sha256(payload).hexdigest(), expected_sha256, source)
    try:
        return _split_paragraphs(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text ({e})") from e


def load_documents(params: CorpusParams) -> list[str]:
    """All documents of one corpus, in a deterministic order."""
    source = params.source
    scheme, _, rest = source.partition(":")
    if source == "stdlib:docstrings":
        docs = stdlib_docstrings()
    elif source == "stdlib:reference":
        docs = stdlib_reference()
    elif scheme == "hf":
        docs = _column(*load_records(source, params.split), column=params.text_column,
                       source=source)
    elif scheme == "url":
        docs = url_text(rest, params.sha256, source)
    elif scheme == "file":
        path = Path(rest)
        if not path.exists():
            raise DataError(f"{source}: file not found")
        if params.sha256 is not None:
            check_sha256(sha256_file(path), params.sha256, source)
        if path.suffix.lower() == ".txt":
            try:
                docs = _split_paragraphs(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not UTF-8 text ({e})") from e
        else:
            docs = _column(*load_records(source), column=params.text_column, source=source)
    else:  # params validation lets nothing else through
        raise DataError(f"{source}: unknown source scheme")
    if params.max_documents is not None:
        docs = docs[: params.max_documents]
    if not docs:
        raise DataError(f"{source}: no documents")
    return docs


def write_texts(path: str | Path, docs: list[str]) -> None:
    write_jsonl(path, ({"text": doc} for doc in docs))


def read_texts(path: str | Path) -> list[str]:
    return [record["text"] for record in read_jsonl(path)]

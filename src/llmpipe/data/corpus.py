"""Text corpora: where documents come from, and the JSONL shards the pipeline keeps them in.

A corpus is a stream of documents. Sources:
- `stdlib:docstrings`: the docstrings of Python's standard library, read by parsing its source
  with `ast` (importing modules would run their side effects), deduplicated, in sorted order;
- `stdlib:reference`: the language-reference topics shipped in `pydoc_data.topics`;
- `hf:<dataset>[:<config>][@<revision>]` with optional `data_files` patterns:
  `datasets.load_dataset(..., streaming=True)`, record batch by record batch (a hub name on a
  GPU box, a local dataset directory, or one data file);
- `url:<address>`: a text file fetched over HTTP(S) and checked against its sha256;
- `file:<path>`: a local .txt (paragraphs split on blank lines), .jsonl or .parquet, or a glob
  of .jsonl/.parquet shards (`file:shards/*.parquet`), read batch by batch.

Stored form (`write_shards`, `read_texts`): a directory of `part-NNNNN.jsonl` files, one
`{"text": ...}` record a line, each shard about SHARD_BYTES. The sha256 of a corpus is that of
its shards' bytes in order, so a corpus in one shard has the digest of the single file.
Nothing holds a whole corpus in memory.
"""

from __future__ import annotations

import ast
import codecs
import glob
import hashlib
import io
import itertools
import json
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from llmpipe.data.params import CorpusParams
from llmpipe.errors import DataError
from llmpipe.io import read_jsonl, sha256_file

SHARD_BYTES = 1 << 28  # 256 MB of JSONL per shard
RECORD_BATCH = 1024  # records per read from a dataset or parquet file
PARQUET_READ_BYTES = 1 << 20  # a parquet column chunk is read this much at a time
TEXT_READ_BYTES = 1 << 20  # a text file is read this much at a time
SHARD_PATTERN = "part-*.jsonl"
SCRIPT_ONLY = "Dataset scripts are no longer supported"
DATA_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}

# Test suites are code about code, not documentation; site-packages is not the stdlib.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}


def stdlib_docstrings() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p
        for p in stdlib.rglob("*.py")
        if not _STDLIB_SKIP_DIRS.intersection(p.relative_to(stdlib).parts)
    )
    docs: set[str] = set()
    for path in files:
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few files are templates or Python 2 fixtures
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
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


def _file_paragraphs(path: Path, source: str) -> Iterator[str]:
    """`_split_paragraphs` of a text file, read a piece at a time: one paragraph at most is
    held, not the file."""
    # \r\n and a lone \r become \n, across pieces too, as read_text's text mode did.
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), True)
    held: list[str] = []  # the text since the last blank line
    tail = ""  # its last character
    with open(path, "rb") as f:
        offset = 0  # bytes read before this piece
        while True:
            data = f.read(TEXT_READ_BYTES)
            try:
                piece = decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not UTF-8 text ({_at(e, offset, len(data))})") from e
            offset += len(data)
            if "\n\n" not in tail + piece[:1] and "\n\n" not in piece:
                held.append(piece)  # no paragraph ends here: joined once, when one does
                tail = piece[-1:] or tail
            else:
                *paragraphs, rest = ("".join(held) + piece).split("\n\n")
                yield from (p.strip() for p in paragraphs if p.strip())
                held, tail = [rest], rest[-1:]
            if not data:  # the decoder's last piece: a \r it held back, if any
                break
    if last := "".join(held).strip():
        yield last


def _at(error: UnicodeDecodeError, offset: int, size: int) -> str:
    """The codec's message for a piece of `size` bytes read at `offset`, with the position in
    the whole file, as read_text gave it. The decoder tried its held bytes (up to 3, of the
    piece before) and the piece: its positions count from the first held byte."""
    start = offset - (len(error.object) - size) + error.start
    if error.end - error.start == 1:
        return (
            f"'{error.encoding}' codec can't decode byte 0x{error.object[error.start]:02x} "
            f"in position {start}: {error.reason}"
        )
    return (
        f"'{error.encoding}' codec can't decode bytes in position "
        f"{start}-{start + error.end - error.start - 1}: {error.reason}"
    )


def require_columns(columns: Sequence[str], needed: Sequence[str], source: str, hint: str) -> None:
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(
            f"{source}: no column {', '.join(repr(c) for c in missing)} "
            f"(columns: {', '.join(columns) or 'none'}); {hint}"
        )


def parse_hf(source: str) -> tuple[str, str | None, str | None]:
    """`hf:<dataset>[:<config>][@<revision>]` -> (dataset, config, revision)."""
    rest = source.removeprefix("hf:")
    rest, at, revision = rest.partition("@")
    name, _, config = rest.partition(":")
    return name, config or None, revision if at else None


def _hf_dataset(source: str, split: str, data_files: Sequence[str] | None, streaming: bool):
    """`datasets.load_dataset` of an hf: source; every way it fails is a DataError that names
    the dataset and the way out."""
    import datasets

    name, config, revision = parse_hf(source)
    local = Path(name)
    files = {"data_files": list(data_files)} if data_files else {}
    try:
        if local.is_file():  # a single local data file: let datasets pick the builder
            builder = DATA_FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise DataError(f"{source}: unsupported data file type {local.suffix!r}")
            _check_parquet_files([local], source)
            return datasets.load_dataset(
                builder, data_files=str(local), split=split, streaming=streaming
            )
        if local.is_dir() and data_files:
            _check_parquet_files(
                [
                    Path(f)
                    for pattern in data_files
                    for f in sorted(glob.glob(str(local / pattern)))
                ],
                source,
            )
        return datasets.load_dataset(
            name, config, split=split, revision=revision, streaming=streaming, **files
        )
    except DataError:
        raise
    except RuntimeError as e:
        if SCRIPT_ONLY in str(e):
            raise DataError(
                f"{source}: a script-only dataset, which datasets no longer loads (since 4.0); "
                f"use its parquet conversion (on the hub: hf:{name}@refs/convert/parquet with "
                "data_files naming its shards) or another copy of the data"
            ) from e
        raise DataError(f"{source}: cannot load dataset ({e})") from e
    except Exception as e:  # datasets and the hub client raise many kinds
        kind = type(e).__name__
        if "Revision" in kind or (revision and "revision" in str(e).lower()):
            raise DataError(
                f"{source}: no revision {revision!r} (name a branch, tag or commit of the dataset)"
            ) from e
        if isinstance(e, ConnectionError) or "offline" in str(e).lower():
            raise DataError(
                f"{source}: the hub is unreachable ({kind}); download it where "
                "the hub is reachable, or point hf: at a local copy"
            ) from e
        if isinstance(e, FileNotFoundError | ValueError | OSError | KeyError):
            raise DataError(f"{source}: cannot load dataset ({kind}: {e})") from e
        raise


def _check_parquet_files(paths: Sequence[Path], source: str) -> None:
    """Read each local parquet file's footer: a truncated or corrupt shard is named before
    anything is written."""
    import pyarrow.parquet as pq

    for path in paths:
        if path.suffix.lower() != ".parquet":
            continue
        try:
            pq.ParquetFile(path)
        except Exception as e:  # pyarrow.ArrowInvalid and friends
            raise DataError(f"{source}: {path}: not a readable parquet file ({e})") from e


def load_records(source: str, split: str = "train") -> tuple[list[dict], list[str]]:
    """Rows and column names of a small tabular source (a preference set): `hf:` (a hub
    name, a dataset directory or a data file) or `file:<path>` (.jsonl or .parquet)."""
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

            _check_parquet_files([path], source)
            table = pq.read_table(path)
            return table.to_pylist(), table.column_names
        raise DataError(
            f"{source}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)"
        )
    if scheme != "hf":
        raise DataError(f"{source}: not a tabular source (use hf: or file:)")
    ds = _hf_dataset(source, split, None, streaming=False)
    return ds.to_list(), list(ds.column_names)


def url_text(url: str, expected_sha256: str | None, source: str) -> list[str]:
    if expected_sha256 is None:
        raise DataError(
            f"{source}: a url: source needs download.<corpus>.sha256 "
            "(the expected checksum of the file)"
        )
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


def _record_batches(params: CorpusParams) -> Iterator[tuple[list, str]]:
    """(values of the text column, where they come from) per batch of a tabular source. The
    source is opened and its first batch read before this returns, so a missing file, dataset,
    revision or column stops the stage before anything is written."""
    source, column = params.source, params.text_column
    scheme, _, rest = source.partition(":")
    hint = "set download.<corpus>.text_column"
    if scheme == "hf":
        ds = _hf_dataset(source, params.split, params.data_files, streaming=True)
        batches = _guarded(((batch, source) for batch in ds.iter(batch_size=RECORD_BATCH)), source)
    else:
        paths = [Path(p) for p in sorted(glob.glob(rest))] if glob.has_magic(rest) else [Path(rest)]
        if not paths or not all(p.exists() for p in paths):
            raise DataError(f"{source}: file not found")
        _check_parquet_files(paths, source)
        batches = _guarded(
            (batch for path in paths for batch in _file_batches(path, source, column)), source
        )
    first = next(batches, None)
    if first is None:
        return iter(())
    require_columns(list(first[0]), [column], source, hint)

    def values():
        for batch, origin in itertools.chain([first], batches):
            if column not in batch:
                require_columns(list(batch), [column], origin, hint)
            yield batch[column], origin

    return values()


def _guarded(batches: Iterator, source: str) -> Iterator:
    """Reading errors met while streaming (a shard that breaks half way) as DataErrors."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataError:
            raise
        except (OSError, ValueError, TypeError) as e:  # pyarrow's errors are ValueError/TypeError
            raise DataError(f"{source}: cannot read ({type(e).__name__}: {e})") from e
        yield batch


def _file_batches(path: Path, source: str, column: str) -> Iterator[tuple[dict, str]]:
    """Column-wise batches of a .jsonl or .parquet file (of a parquet file, only `column`
    when it has it)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_batches(path, column, f"{source} ({path.name})")
    elif suffix == ".jsonl":
        rows: list[dict] = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_no}: not a JSON object (a record)")
                rows.append(row)
                if len(rows) == RECORD_BATCH:
                    yield _columns(rows), f"{source} ({path.name})"
                    rows = []
        if rows:
            yield _columns(rows), f"{source} ({path.name})"
    else:
        raise DataError(
            f"{source}: unsupported file type {suffix!r} (use .txt, .jsonl or .parquet)"
        )


def _parquet_batches(path: Path, column: str, origin: str) -> Iterator[tuple[dict, str]]:
    """A parquet file batch by batch, in memory bounded whatever the file's size and row
    groups."""
    import pyarrow.parquet as pq

    # pre_buffer=False: with pyarrow's default pre-buffering, iter_batches keeps the bytes of
    # every row group it has read until the file is closed, so memory grew with the file
    # (download of one 400 MB-of-text file: 350 MB, against 180 MB for 100 MB; bench/README.md).
    # buffer_size: each column chunk is streamed in pieces instead of being read whole, so a
    # file written as a few huge row groups (pyarrow writes 1Mi rows a group by default) is
    # read in bounded memory too.
    with pq.ParquetFile(path, pre_buffer=False, buffer_size=PARQUET_READ_BYTES) as parquet:
        # Only the text column is read and decoded. A file without it is read whole, so that
        # the missing-column error lists the columns it has.
        columns = [column] if column in parquet.schema_arrow.names else None
        for batch in parquet.iter_batches(batch_size=RECORD_BATCH, columns=columns):
            yield batch.to_pydict(), origin


def _columns(rows: list[dict]) -> dict[str, list]:
    keys = sorted(set().union(*(r.keys() for r in rows)))
    return {k: [r.get(k) for r in rows] for k in keys}


def _texts_of(batches: Iterator[tuple[list, str]], column: str) -> Iterator[str]:
    row, last_origin = 0, None
    for values, origin in batches:
        if origin != last_origin:  # rows count within each file
            row, last_origin = 0, origin
        for value in values:
            if not isinstance(value, str):
                raise DataError(
                    f"{origin}: row {row} column {column!r} is {type(value).__name__}, not text"
                )
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate, say
                raise DataError(f"{origin}: row {row} is not UTF-8 text ({e})") from e
            row += 1
            if value.strip():
                yield value


def open_documents(params: CorpusParams) -> Iterator[str]:
    """The documents of one corpus, streamed in a deterministic order, up to the caps
    (`max_documents`, `max_bytes`). What can be checked before reading (the source exists,
    its revision and column) is checked before this returns."""
    source = params.source
    scheme, _, rest = source.partition(":")
    if source == "stdlib:docstrings":
        docs: Iterable[str] = stdlib_docstrings()
    elif source == "stdlib:reference":
        docs = stdlib_reference()
    elif scheme == "url":
        docs = url_text(rest, params.sha256, source)
    elif scheme == "file" and not glob.has_magic(rest) and Path(rest).suffix.lower() == ".txt":
        path = Path(rest)
        if not path.exists():
            raise DataError(f"{source}: file not found")
        if params.sha256 is not None:
            check_sha256(sha256_file(path), params.sha256, source)
        docs = _file_paragraphs(path, source)
    elif scheme in ("hf", "file"):
        if scheme == "file" and params.sha256 is not None:
            if glob.has_magic(rest) or not Path(rest).is_file():
                raise DataError(
                    f"{source}: download.<corpus>.sha256 checks one file, not a pattern of shards"
                )
            check_sha256(sha256_file(rest), params.sha256, source)
        docs = _texts_of(_record_batches(params), params.text_column)
    else:  # params validation lets nothing else through
        raise DataError(f"{source}: unknown source scheme")
    docs = capped(docs, params.max_documents, params.max_bytes)
    first = next(docs, None)  # an empty corpus stops the stage before anything is written
    if first is None:
        raise DataError(f"{source}: no documents")
    return itertools.chain([first], docs)


def capped(
    docs: Iterable[str], max_documents: int | None = None, max_bytes: int | None = None
) -> Iterator[str]:
    """The leading documents of `docs`: at most `max_documents` of them and `max_bytes` of
    UTF-8 text (None: no cap). Reads no document past the cap."""
    if max_documents == 0:
        return
    count, size = 0, 0
    for doc in docs:
        if max_bytes is not None:
            size += len(doc.encode("utf-8"))
            if size > max_bytes:
                return
        yield doc
        count += 1
        if count == max_documents:
            return


def load_documents(params: CorpusParams) -> list[str]:
    """All documents of one corpus, in memory: for small corpora and tests."""
    return list(open_documents(params))


@dataclass(frozen=True)
class CorpusStats:
    documents: int
    bytes: int  # UTF-8 bytes of the texts
    sha256: str  # of the shards' bytes, in order
    shards: int


def write_shards(
    directory: str | Path, docs: Iterable[str], shard_bytes: int = SHARD_BYTES
) -> CorpusStats:
    """Write documents as JSONL shards of about `shard_bytes` into `directory` (a fresh
    directory: the caller writes it atomically as a whole)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    documents = text_size = shards = shard_size = 0
    f = None
    try:
        for doc in docs:
            if f is None or shard_size >= shard_bytes:
                if f is not None:
                    f.close()
                f = open(directory / f"part-{shards:05d}.jsonl", "wb")
                shards, shard_size = shards + 1, 0
            line = (json.dumps({"text": doc}, ensure_ascii=False) + "\n").encode("utf-8")
            f.write(line)
            digest.update(line)
            shard_size += len(line)
            documents += 1
            text_size += len(doc.encode("utf-8"))
    finally:
        if f is not None:
            f.close()
    return CorpusStats(documents, text_size, digest.hexdigest(), shards)


def read_texts(directory: str | Path) -> Iterator[str]:
    """The documents of a corpus directory, shard by shard; a missing corpus, a bad line or a
    text that is not UTF-8 is a DataError naming the shard."""
    directory = Path(directory)
    shards = sorted(directory.glob(SHARD_PATTERN))
    if not shards:
        raise DataError(f"{directory}: no {SHARD_PATTERN} shards (run the download stage first)")
    return _read_shards(shards)


def _read_shards(shards: list[Path]) -> Iterator[str]:
    for shard in shards:
        with open(shard, "rb") as f:
            for line_no, line in enumerate(f, 1):
                try:
                    yield json.loads(line.decode("utf-8"))["text"]
                except UnicodeDecodeError as e:
                    raise DataError(f"{shard}:{line_no}: not UTF-8 text ({e})") from e
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f'{shard}:{line_no}: not a {{"text": ...}} record') from e

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.corpus import load_documents, write_texts
from llmpipe.errors import DataError
from llmpipe.io import sha256_file
from llmpipe.params import CorpusParams


def corpus(source: str, **changes) -> CorpusParams:
    """A corpus section as params.yaml spells it out, with `changes`."""
    return CorpusParams(**{"source": source, "split": "train", "text_column": "text",
                           "sha256": None, "max_documents": None, **changes})


def test_stdlib_docstrings_are_deterministic(tmp_path):
    first = load_documents(corpus("stdlib:docstrings"))
    second = load_documents(corpus("stdlib:docstrings"))
    assert len(first) > 1000 and len(set(first)) == len(first)  # deduplicated
    write_texts(tmp_path / "a.jsonl", first)
    write_texts(tmp_path / "b.jsonl", second)
    assert sha256_file(tmp_path / "a.jsonl") == sha256_file(tmp_path / "b.jsonl")


def test_stdlib_reference_and_max_documents():
    docs = load_documents(corpus("stdlib:reference", max_documents=5))
    assert len(docs) == 5 and all(doc.strip() for doc in docs)


@pytest.fixture
def records():
    return [{"body": f"document {i}", "id": i} for i in range(5)]


def test_local_parquet_and_jsonl_through_hf_and_file(tmp_path, records):
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    expected = [r["body"] for r in records]
    for source in (f"hf:{parquet}", f"hf:{jsonl}", f"file:{parquet}", f"file:{jsonl}"):
        assert load_documents(corpus(source, text_column="body")) == expected


def test_hf_dataset_directory(tmp_path, records):
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "ds" / "train.parquet"))
    docs = load_documents(corpus(f"hf:{tmp_path / 'ds'}", text_column="body"))
    assert docs == [r["body"] for r in records]


def test_missing_column_is_a_clear_error(tmp_path, records):
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    with pytest.raises(DataError,
                       match=r"hf:.*corpus\.parquet: no column 'text' \(columns: body, id\)"):
        load_documents(corpus(f"hf:{parquet}"))


def test_text_file_paragraphs_and_checksums(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text("First Citizen:\nBefore we proceed.\n\nAll:\nSpeak, speak.\n")
    digest = sha256_file(path)
    docs = load_documents(corpus(f"url:file://{path}", sha256=digest))
    assert docs == ["First Citizen:\nBefore we proceed.", "All:\nSpeak, speak."]
    assert load_documents(corpus(f"file:{path}", sha256=digest)) == docs
    with pytest.raises(DataError, match="checksum mismatch: expected sha256 0+, got " + digest):
        load_documents(corpus(f"url:file://{path}", sha256="0" * 64))
    with pytest.raises(DataError, match="needs download.<corpus>.sha256"):
        load_documents(corpus(f"url:file://{path}"))


def test_unreachable_sources_name_themselves(tmp_path):
    with pytest.raises(DataError, match=r"^url:file:///nonexistent/x\.txt: unreachable"):
        load_documents(corpus("url:file:///nonexistent/x.txt", sha256="0" * 64))
    with pytest.raises(DataError, match=r"^file:/nonexistent\.jsonl: file not found"):
        load_documents(corpus("file:/nonexistent.jsonl"))
    with pytest.raises(DataError, match=r"^hf:/nonexistent_dataset_dir: cannot load dataset"):
        load_documents(corpus("hf:/nonexistent_dataset_dir"))

import json
import random
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmpipe.data.corpus import load_documents, read_texts, write_shards
from llmpipe.data.params import CorpusParams
from llmpipe.errors import DataError
from llmpipe.io import sha256_file


def corpus(source: str, **changes) -> CorpusParams:
    """A corpus section as params.yaml spells it out, with `changes`."""
    return CorpusParams(
        **{
            "source": source,
            "split": "train",
            "text_column": "text",
            "sha256": None,
            "data_files": None,
            "max_documents": None,
            "max_bytes": None,
            **changes,
        }
    )


def test_stdlib_docstrings_are_deterministic(tmp_path):
    first = load_documents(corpus("stdlib:docstrings"))
    second = load_documents(corpus("stdlib:docstrings"))
    assert len(first) > 1000 and len(set(first)) == len(first)  # deduplicated
    assert write_shards(tmp_path / "a", first) == write_shards(tmp_path / "b", second)


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
    with pytest.raises(
        DataError, match=r"hf:.*corpus\.parquet: no column 'text' \(columns: body, id\)"
    ):
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


def test_a_text_file_is_read_piece_by_piece_into_the_same_paragraphs(tmp_path, monkeypatch):
    import llmpipe.data.corpus as corpus_module

    path = tmp_path / "book.txt"
    rng = random.Random(0)
    pieces = ["a", "bé", " ", "\n", "\r", "\r\n", "\n\n", "\n\n\n", "\r\r", "€", "\t"]
    text = "".join(rng.choice(pieces) for _ in range(3000))
    path.write_bytes(text.encode("utf-8"))
    # what the whole-file read gave: text mode's newlines, then split on blank lines
    expected = corpus_module._split_paragraphs(path.read_text(encoding="utf-8"))
    assert len(expected) > 50
    for size in (1, 2, 3, 7, 1000):  # pieces that cut \r\n, blank lines and characters
        monkeypatch.setattr(corpus_module, "TEXT_READ_BYTES", size)
        assert load_documents(corpus(f"file:{path}")) == expected

    # a byte that is not UTF-8 is named at its position in the file, as before
    path.write_bytes(b"fine\n\n" * 10 + b"caf\xe9 au lait")
    with pytest.raises(UnicodeDecodeError) as whole:
        path.read_text(encoding="utf-8")
    with pytest.raises(DataError) as streamed:
        load_documents(corpus(f"file:{path}"))
    assert str(streamed.value) == f"file:{path}: not UTF-8 text ({whole.value})"
    assert "position 63" in str(streamed.value)


def test_unreachable_sources_name_themselves(tmp_path):
    with pytest.raises(DataError, match=r"^url:file:///nonexistent/x\.txt: unreachable"):
        load_documents(corpus("url:file:///nonexistent/x.txt", sha256="0" * 64))
    with pytest.raises(DataError, match=r"^file:/nonexistent\.jsonl: file not found"):
        load_documents(corpus("file:/nonexistent.jsonl"))
    with pytest.raises(DataError, match=r"^hf:/nonexistent_dataset_dir: cannot load dataset"):
        load_documents(corpus("hf:/nonexistent_dataset_dir"))


def write_parquet_shards(directory, texts, shards):
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(texts) // shards)
    for i in range(shards):
        pq.write_table(
            pa.Table.from_pylist(
                [{"text": t, "n": j} for j, t in enumerate(texts[i * per : (i + 1) * per])]
            ),
            directory / f"shard-{i:03d}.parquet",
        )


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A few MB of text in four parquet shards."""
    directory = tmp_path_factory.mktemp("sharded")
    rng = random.Random(0)
    texts = [
        f"Document {i}: " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(100))
        for i in range(4000)
    ]
    write_parquet_shards(directory, texts, 4)
    return directory, texts


def test_a_sharded_corpus_streams_through_hf_patterns_and_file_globs(sharded):
    directory, texts = sharded
    assert sum(f.stat().st_size for f in directory.iterdir()) > 2e6  # parquet, compressed
    through_hf = load_documents(corpus(f"hf:{directory}", data_files=["shard-*.parquet"]))
    through_file = load_documents(corpus(f"file:{directory}/shard-*.parquet"))
    assert through_hf == through_file == texts
    assert (
        load_documents(corpus(f"hf:{directory}", data_files=["shard-00[01].parquet"]))
        == texts[:2000]
    )
    assert load_documents(corpus(f"file:{directory}/*.parquet", max_documents=3)) == texts[:3]
    capped = load_documents(corpus(f"file:{directory}/*.parquet", max_bytes=10_000))
    assert capped == texts[: len(capped)] and 0 < sum(len(t) for t in capped) <= 10_000
    assert sum(len(t) for t in texts[: len(capped) + 1]) > 10_000


def test_a_parquet_file_in_many_row_groups_reads_its_text_column_in_bounded_memory(
    tmp_path, monkeypatch
):
    import llmpipe.data.corpus as corpus_module

    rng = random.Random(1)
    texts = [
        "".join(rng.choice("abcdefghij klmnopqrst\n") for _ in range(400)) + f" {i}"
        for i in range(32_000)
    ]
    texts[5] = "   "  # blank: skipped, as before
    table = pa.table({"id": range(len(texts)), "text": texts, "extra": [t[:50] for t in texts]})
    many = tmp_path / "many.parquet"
    pq.write_table(table, many, row_group_size=2000)  # 16 row groups of about 800 KB
    one = tmp_path / "one.parquet"
    pq.write_table(table, one)  # one row group of 13 MB
    expected = [t for t in texts if t.strip()]
    assert pq.ParquetFile(many).metadata.num_row_groups == 16

    monkeypatch.setattr(corpus_module, "PARQUET_READ_BYTES", 64 << 10)
    for path in (many, one):
        before = peak = pa.total_allocated_bytes()
        docs = []
        for doc in corpus_module.open_documents(corpus(f"file:{path}")):
            docs.append(doc)
            if len(docs) % 500 == 0:
                peak = max(peak, pa.total_allocated_bytes())
        assert docs == expected
        # Arrow's memory stays at a few pages (1 MB each). With pyarrow's defaults
        # (pre-buffering, every column, column chunks read whole) it grew with the file:
        # each row group read so far was kept, or the one row group was read whole.
        assert peak - before < 4e6, (path.name, peak - before)

    # the stage writes the same raw shards from either file
    stats = [
        write_shards(tmp_path / name, load_documents(corpus(f"file:{path}")))
        for name, path in (("a", many), ("b", one))
    ]
    assert stats[0] == stats[1] and list(read_texts(tmp_path / "a")) == expected
    # a file without the column still names the columns it has
    with pytest.raises(
        DataError,
        match=r"^file:.*many\.parquet: no column 'body' "
        r"\(columns: id, text, extra\)",
    ):
        load_documents(corpus(f"file:{many}", text_column="body"))


def test_shards_roll_over_and_read_back_with_the_digest_of_one_file(tmp_path, sharded):
    _, texts = sharded
    many = write_shards(tmp_path / "many", texts, shard_bytes=200_000)
    one = write_shards(tmp_path / "one", texts)
    assert many.shards > 5 and one.shards == 1
    assert (many.documents, many.bytes, many.sha256) == (one.documents, one.bytes, one.sha256)
    assert one.sha256 == sha256_file(tmp_path / "one/part-00000.jsonl")
    assert list(read_texts(tmp_path / "many")) == texts


def test_bad_sources_stop_with_one_line_naming_them(tmp_path, sharded, monkeypatch):
    directory, texts = sharded
    script_only = tmp_path / "old_dataset"
    script_only.mkdir()
    (script_only / "old_dataset.py").write_text("# a loading script\n")
    with pytest.raises(
        DataError,
        match=r"^hf:.*old_dataset: a script-only dataset, which "
        r"datasets no longer loads \(since 4\.0\); use its "
        r"parquet conversion \(on the hub: "
        r"hf:.*@refs/convert/parquet",
    ):
        load_documents(corpus(f"hf:{script_only}"))

    broken = tmp_path / "broken"
    write_parquet_shards(broken, texts[:100], 2)
    data = (broken / "shard-001.parquet").read_bytes()
    (broken / "shard-001.parquet").write_bytes(data[: len(data) // 2])  # truncated
    for source, extra in (
        (f"hf:{broken}", {"data_files": ["*.parquet"]}),
        (f"file:{broken}/*.parquet", {}),
    ):
        with pytest.raises(DataError, match=r"shard-001\.parquet: not a readable parquet file"):
            load_documents(corpus(source, **extra))

    with pytest.raises(DataError, match=r"no column 'body' \(columns: text, n\)"):
        load_documents(corpus(f"file:{directory}/*.parquet", text_column="body"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "   "}\n')
    with pytest.raises(DataError, match=r"^file:.*empty\.jsonl: no documents$"):
        load_documents(corpus(f"file:{empty}"))
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(
        DataError,
        match=r"^file:.*latin1\.jsonl: cannot read "
        r"\(UnicodeDecodeError",
    ):
        load_documents(corpus(f"file:{latin1}"))


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("revision", r"^hf:someone/corpus@v9: no revision 'v9' \(name a branch, tag or commit"),
        ("offline", r"^hf:someone/corpus@v9: the hub is unreachable \(OfflineModeIsEnabled\)"),
    ],
)
def test_hub_failures_name_the_dataset_and_the_way_out(monkeypatch, error, message):
    import datasets
    from huggingface_hub.errors import OfflineModeIsEnabled, RevisionNotFoundError

    def load_dataset(*args, **kwargs):
        assert kwargs["revision"] == "v9" and kwargs["streaming"]
        if error == "revision":
            response = SimpleNamespace(headers={}, request=None)  # what the error reads of one
            raise RevisionNotFoundError("404 Client Error: Revision Not Found", response=response)
        raise OfflineModeIsEnabled("Cannot reach the hub: offline mode is enabled.")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=message):
        load_documents(corpus("hf:someone/corpus@v9"))


def test_a_text_shard_that_is_not_utf8_is_named(tmp_path):
    write_shards(tmp_path / "raw", ["fine"])
    (tmp_path / "raw/part-00001.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"part-00001\.jsonl:1: not UTF-8 text"):
        list(read_texts(tmp_path / "raw"))
    with pytest.raises(DataError, match=r"no part-\*\.jsonl shards \(run the download stage"):
        read_texts(tmp_path / "nothing")


def test_a_bad_source_leaves_the_previous_download_intact(tmp_path, sharded):
    from conftest import ROOT, run, set_params

    directory, texts = sharded
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(
        tmp_path,
        {
            "download.pretrain.source": f"file:{directory}/*.parquet",
            "download.finetune.max_documents": 5,
        },
    )
    run(["python", "-m", "stages.download"], tmp_path)
    assert list(read_texts(tmp_path / "data/raw/pretrain")) == texts
    before = {p: p.read_bytes() for p in sorted((tmp_path / "data/raw").rglob("*.jsonl"))}
    metrics = json.loads((tmp_path / "metrics/download.json").read_text())
    assert metrics["pretrain"]["documents"] == len(texts) and metrics["finetune"]["shards"] == 1

    set_params(tmp_path, {"download.finetune.source": f"file:{tmp_path}/missing.parquet"})
    result = run(["python", "-m", "stages.download"], tmp_path, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: file:{tmp_path}/missing.parquet: file not found"
    assert {p: p.read_bytes() for p in sorted((tmp_path / "data/raw").rglob("*.jsonl"))} == before
    assert not list((tmp_path / "data").glob(".raw.*"))  # no temporary left behind


def test_a_source_that_breaks_half_way_leaves_the_previous_download_intact(tmp_path):
    from conftest import ROOT, run, set_params

    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000)))
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(
        tmp_path,
        {"download.pretrain.source": f"file:{good}", "download.finetune.source": f"file:{good}"},
    )
    run(["python", "-m", "stages.download"], tmp_path)
    before = {p: p.read_bytes() for p in sorted((tmp_path / "data/raw").rglob("*.jsonl"))}

    broken = tmp_path / "broken.jsonl"  # fine for 2000 records, then a line that is no JSON
    broken.write_text(
        good.read_text()[: good.read_text().index('{"text": "doc 2000"}')] + "{not json\n"
    )
    set_params(tmp_path, {"download.finetune.source": f"file:{broken}"})
    (tmp_path / "data/.raw.killed.tmp").mkdir()  # what a kill during a download leaves
    result = run(["python", "-m", "stages.download"], tmp_path, check=False)
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: {broken}:2001: not valid JSON (Expecting property "
        "name enclosed in double quotes)"
    )
    assert {p: p.read_bytes() for p in sorted((tmp_path / "data/raw").rglob("*.jsonl"))} == before
    assert not list((tmp_path / "data").glob(".raw.*"))


def test_records_that_are_not_objects_or_not_utf8_are_named(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "fine"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"rows\.jsonl:2: not a JSON object"):
        load_documents(corpus(f"file:{rows}"))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"text": "fine"}\n{"text": "bad \\udc80"}\n')
    with pytest.raises(DataError, match=r"surrogate\.jsonl\): row 1 is not UTF-8 text"):
        load_documents(corpus(f"file:{surrogate}"))


def test_the_datasets_wrapped_revision_error_is_named(monkeypatch):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    def load_dataset(*args, **kwargs):  # what datasets raises for a revision that is not there
        raise DatasetNotFoundError(
            "Revision 'v9' doesn't exist for dataset 'someone/corpus' on the Hub."
        )

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(DataError, match=r"^hf:someone/corpus@v9: no revision 'v9'"):
        load_documents(corpus("hf:someone/corpus@v9"))


def test_data_files_belong_to_hf_sources():
    from llmpipe.errors import ParamsError
    from llmpipe.params import build

    with pytest.raises(
        ParamsError,
        match=r"^download\.pretrain\.data_files: \['\*\.parquet'\] "
        r"applies to hf: sources only",
    ):
        build(
            CorpusParams,
            {
                "source": "file:x.jsonl",
                "split": "train",
                "text_column": "text",
                "sha256": None,
                "data_files": ["*.parquet"],
                "max_documents": None,
                "max_bytes": None,
            },
            "download.pretrain",
        )

"""Tokenize at scale: MB/s and peak memory of the tokenize stage's streaming path with 1 and 2
worker processes, against the code before it (the whole corpus in memory, encoder threads);
with --e2e, the peak memory of download then tokenize, end to end, on one local parquet file.

    python bench/tokenize_scale.py [--mb 250 500] [--dir /tmp/llmpipe-bench]
    python bench/tokenize_scale.py --e2e [--mb 100 400] [--train-bytes 50000000]

Builds corpora of the given sizes from the standard library's docstrings, repeated in a seeded
order, each copy marked so that every document is distinct, as download's JSONL shards. Each
configuration runs in a fresh process (peak resident memory is per process: the parent, and the
largest worker) on the same tokenizer (a byte-level BPE of 4096 trained on the docstrings).
The timed part is what the stage times: the encoding pass (the split is fitted before it).

--e2e writes the same documents as one parquet file (an `id` and a `text` column, in row groups
of --row-group-rows rows) and runs the stages as a user does: `python -m stages.download` then
`python -m stages.tokenize` in a scratch directory whose params.yaml is the repository's with
`download.pretrain.source: file:<the parquet file>` and `tokenize.train_bytes` (default 50 MB:
the BPE is trained on a bounded sample, as a large corpus should be; 0 trains on all of it);
the finetune corpus stays the embedded stdlib:reference. Peak memory is that of each stage's
whole process tree: the summed PSS of the stage and its encoding workers (a page they share
counts once over them, so the sum is what the tree holds), polled every 20 ms, and the
largest single process's ru_maxrss.
"""

import argparse
import contextlib
import itertools
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from llmpipe.data.corpus import read_texts, stdlib_docstrings, write_shards

# llmpipe.data.tokenization (which imports torch, 200 MB) is imported where it is used: --e2e's
# parent must stay small, as Linux carries a parent's peak RSS into the ru_maxrss of a child
# it forks, across exec.

SEED = 0
REPO = Path(__file__).resolve().parent.parent


def documents(megabytes: int) -> Iterator[str]:
    """The docstrings, copy after copy in a seeded order, each copy marked, until `megabytes`
    of UTF-8 text."""
    docs = stdlib_docstrings()
    rng = random.Random(SEED)
    size, copy = 0, 0
    while size < megabytes * 1e6:
        order = docs[:]
        rng.shuffle(order)
        for doc in order:
            text = f"{doc}\n(copy {copy})"
            size += len(text.encode("utf-8"))
            yield text
        copy += 1


def build_corpus(directory: Path, megabytes: int) -> None:
    if (directory / "done").exists():
        return
    write_shards(directory, documents(megabytes), shard_bytes=1 << 26)
    (directory / "done").write_text("")


def build_parquet(path: Path, megabytes: int, row_group_rows: int) -> None:
    """One parquet file of `documents(megabytes)`, written row group by row group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    tmp = path.with_suffix(".tmp")
    docs = documents(megabytes)
    with pq.ParquetWriter(tmp, schema) as writer:
        row = 0
        while group := list(itertools.islice(docs, row_group_rows)):
            writer.write_table(
                pa.table({"id": range(row, row + len(group)), "text": group}, schema=schema),
                row_group_size=row_group_rows,
            )
            row += len(group)
    tmp.rename(path)


def _pss(pid: int) -> int:
    """Proportional set size of a process, bytes: its resident pages, each page shared with
    forked workers counted once over them all (what the tree really holds)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_peak(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`: the peak of its process tree's summed PSS (polled every 20 ms) and the
    kernel's ru_maxrss over it and its waited-for children (the largest single process), MB."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    peak, done = 0, threading.Event()

    def poll() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                tree = [root.pid, *(p.pid for p in root.children(recursive=True))]
            except psutil.Error:  # the stage itself ended
                return
            total = 0
            for pid in tree:
                with contextlib.suppress(OSError):  # a worker that just ended
                    total += _pss(pid)
            peak = max(peak, total)
            done.wait(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{output}")
    return {
        "tree_peak_mb": peak / 2**20,
        "process_peak_mb": usage.ru_maxrss / 1024,
        "seconds": time.perf_counter() - started,
        "output": output,
    }


def end_to_end(
    directory: Path, megabytes: int, row_group_rows: int, train_bytes: int | None
) -> dict:
    """download then tokenize of one parquet file of `megabytes`: each stage's figures."""
    import yaml

    parquet = directory / f"corpus-{megabytes}mb-rg{row_group_rows}.parquet"
    # In a child: a stage forked from a parent that held the corpus would inherit its peak
    # (Linux keeps ru_maxrss across exec).
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--build-parquet",
            str(parquet),
            str(megabytes),
            str(row_group_rows),
        ],
        check=True,
    )
    work = directory / f"e2e-{megabytes}mb"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download"]["pretrain"]["source"] = f"file:{parquet}"
    params["tokenize"]["train_bytes"] = train_bytes
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    stages = {
        stage: tree_peak([sys.executable, "-m", f"stages.{stage}"], work, env)
        for stage in ("download", "tokenize")
    }
    tokens = json.loads((work / "metrics" / "tokenize.json").read_text())
    result = {
        "text_mb": json.loads((work / "metrics" / "download.json").read_text())["pretrain"]["bytes"]
        / 1e6,
        "parquet_mb": parquet.stat().st_size / 1e6,
        "tokens": tokens["pretrain_train_tokens"] + tokens["pretrain_val_tokens"],
        "stages": {
            name: {k: v for k, v in r.items() if k != "output"} for name, r in stages.items()
        },
    }
    shutil.rmtree(work)
    return result


def main_e2e(args: argparse.Namespace) -> None:
    rows = []
    for megabytes in args.mb:
        rows.append(end_to_end(args.dir, megabytes, args.row_group_rows, args.train_bytes))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(
        f"{os.cpu_count()} CPUs; one parquet file in row groups of {args.row_group_rows:,} "
        f"rows; tokenize.train_bytes {args.train_bytes}; peak memory in MB: of each stage's "
        "process tree (summed PSS) and of its largest process (ru_maxrss)"
    )
    print(
        "| text MB | parquet MB | download tree | download largest | tokenize tree | tokenize "
        "largest | end-to-end peak | vs first | download s | tokenize s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    first = None
    for r in rows:
        d, t = r["stages"]["download"], r["stages"]["tokenize"]
        peak = max(d["tree_peak_mb"], t["tree_peak_mb"])
        first = first or peak
        print(
            f"| {r['text_mb']:.0f} | {r['parquet_mb']:.0f} | {d['tree_peak_mb']:.0f} | "
            f"{d['process_peak_mb']:.0f} | {t['tree_peak_mb']:.0f} | "
            f"{t['process_peak_mb']:.0f} | {peak:.0f} | {peak / first:.2f}x | "
            f"{d['seconds']:.0f} | {t['seconds']:.0f} |"
        )
    if len(rows) > 1:  # the target: flat in corpus size, stage by stage and end to end
        ratios = {
            name: rows[-1]["stages"][name]["tree_peak_mb"] / rows[0]["stages"][name]["tree_peak_mb"]
            for name in ("download", "tokenize")
        }
        peaks = [max(s["tree_peak_mb"] for s in r["stages"].values()) for r in rows]
        print(
            f"\npeak at {rows[-1]['text_mb']:.0f} MB / at {rows[0]['text_mb']:.0f} MB: "
            f"download {ratios['download']:.2f}x, tokenize {ratios['tokenize']:.2f}x, "
            f"end to end {peaks[-1] / peaks[0]:.2f}x"
        )


def run(config: str, corpus: Path, tokenizer_dir: Path, out: Path) -> dict:
    """One configuration, in this process: its figures as a dict."""
    from transformers import AutoTokenizer

    from llmpipe.data.tokenization import (
        DocumentSplit,
        FastEncoder,
        chunks,
        split_by_document,
        write_corpus,
    )

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    encoder = FastEncoder(tokenizer, sample=list(itertools.islice(read_texts(corpus), 200)))
    if config == "before (in memory, threads)":  # a thread per core
        docs = list(read_texts(corpus))  # what the stage did: every document in a list
        started = time.perf_counter()
        split = split_by_document(docs, 0.1, SEED, "bench")
        n_bytes = 0
        for name, part in split.items():
            with open(out / f"{name}.bin", "wb") as f:
                for group in chunks(part):
                    encoder.encode_to_array(group, np.dtype(np.uint16)).tofile(f)
                    n_bytes += sum(len(d.encode("utf-8")) for d in group)
        seconds = time.perf_counter() - started
    else:
        workers = int(config.split()[0])
        split = DocumentSplit.fit(read_texts(corpus), 0.1, SEED, "bench")
        started = time.perf_counter()
        meta = write_corpus(
            out, read_texts(corpus), split, encoder, len(tokenizer), "bpe", num_proc=workers
        )
        seconds = time.perf_counter() - started
        n_bytes = sum(s["bytes"] for s in meta["splits"].values())
    return {
        "mb_per_s": n_bytes / seconds / 1e6,
        "mb": n_bytes / 1e6,
        "parent_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb",
        type=int,
        nargs="+",
        help="corpus sizes in MB of text (default: 250 500; --e2e: 100 400)",
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmpipe-bench"))
    parser.add_argument(
        "--e2e", action="store_true", help="download + tokenize of one parquet file, peak memory"
    )
    parser.add_argument(
        "--row-group-rows", type=int, default=1 << 16, help="--e2e: rows per parquet row group"
    )
    parser.add_argument(
        "--train-bytes",
        type=int,
        default=50_000_000,
        help="--e2e: tokenize.train_bytes (0: null, the whole corpus)",
    )
    parser.add_argument("--run", nargs=4, help=argparse.SUPPRESS)  # config corpus tok out
    parser.add_argument("--build-parquet", nargs=3, help=argparse.SUPPRESS)  # path mb rows
    args = parser.parse_args()
    if args.build_parquet:
        path, megabytes, rows = args.build_parquet
        build_parquet(Path(path), int(megabytes), int(rows))
        return
    if args.e2e:
        args.mb = args.mb or [100, 400]
        args.train_bytes = args.train_bytes or None
        main_e2e(args)
        return
    args.mb = args.mb or [250, 500]
    if args.run:
        config, corpus, tokenizer_dir, out = args.run
        Path(out).mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(config, Path(corpus), Path(tokenizer_dir), Path(out))))
        return

    from llmpipe.data.tokenization import train_bpe

    tokenizer_dir = args.dir / "tokenizer"
    if not tokenizer_dir.exists():
        train_bpe(stdlib_docstrings(), 4096, 2).save_pretrained(tokenizer_dir)
    configs = ("before (in memory, threads)", "1 worker", "2 workers")
    rows = []
    for megabytes in args.mb:
        corpus = args.dir / f"corpus-{megabytes}mb"
        build_corpus(corpus, megabytes)
        for config in configs:
            env = {**os.environ, "TQDM_DISABLE": "1"}
            result = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--run",
                    config,
                    str(corpus),
                    str(tokenizer_dir),
                    str(args.dir / "out"),
                ],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            rows.append((megabytes, config, json.loads(result.stdout.splitlines()[-1])))
            print(rows[-1], file=sys.stderr)
    print(f"{os.cpu_count()} CPUs; BPE 4096 (tiktoken); figures of one run each")
    print(
        "| corpus | configuration | MB/s | MB/s per worker | vs 1 worker | peak RSS parent "
        "MB | peak RSS worker MB |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for megabytes, config, r in rows:
        one = next(x for m, c, x in rows if m == megabytes and c == "1 worker")
        workers = int(config.split()[0]) if config[0].isdigit() else None
        per = f"{r['mb_per_s'] / workers:.1f}" if workers else ""
        print(
            f"| {r['mb']:.0f} MB | {config} | {r['mb_per_s']:.1f} | {per} | "
            f"{r['mb_per_s'] / one['mb_per_s']:.2f}x | {r['parent_peak_mb']:.0f} | "
            f"{r['worker_peak_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()

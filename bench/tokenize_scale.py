"""Tokenize at scale: MB/s and peak memory of the tokenize stage's streaming path with 1 and 2
worker processes, against the code before it (the whole corpus in memory, encoder threads).

    python bench/tokenize_scale.py [--mb 250 500] [--dir /tmp/llmpipe-bench]

Builds corpora of the given sizes from the standard library's docstrings, repeated in a seeded
order, each copy marked so that every document is distinct, as download's JSONL shards. Each
configuration runs in a fresh process (peak resident memory is per process: the parent, and the
largest worker) on the same tokenizer (a byte-level BPE of 4096 trained on the docstrings).
The timed part is what the stage times: the encoding pass (the split is fitted before it).
"""

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmpipe.corpus import read_texts, stdlib_docstrings, write_shards
from llmpipe.tokenization import (
    DocumentSplit,
    FastEncoder,
    chunks,
    split_by_document,
    train_bpe,
    write_corpus,
)

SEED = 0


def build_corpus(directory: Path, megabytes: int) -> None:
    if (directory / "done").exists():
        return
    docs = stdlib_docstrings()
    rng = random.Random(SEED)

    def stream():
        size, copy = 0, 0
        while size < megabytes * 1e6:
            order = docs[:]
            rng.shuffle(order)
            for doc in order:
                text = f"{doc}\n(copy {copy})"
                size += len(text.encode("utf-8"))
                yield text
            copy += 1

    write_shards(directory, stream(), shard_bytes=1 << 26)
    (directory / "done").write_text("")


def run(config: str, corpus: Path, tokenizer_dir: Path, out: Path) -> dict:
    """One configuration, in this process: its figures as a dict."""
    from transformers import AutoTokenizer

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
        meta = write_corpus(out, read_texts(corpus), split, encoder, len(tokenizer), "bpe",
                            num_proc=workers)
        seconds = time.perf_counter() - started
        n_bytes = sum(s["bytes"] for s in meta["splits"].values())
    return {"mb_per_s": n_bytes / seconds / 1e6, "mb": n_bytes / 1e6,
            "parent_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[250, 500])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llmpipe-bench"))
    parser.add_argument("--run", nargs=4, help=argparse.SUPPRESS)  # config corpus tok out
    args = parser.parse_args()
    if args.run:
        config, corpus, tokenizer_dir, out = args.run
        Path(out).mkdir(parents=True, exist_ok=True)
        print(json.dumps(run(config, Path(corpus), Path(tokenizer_dir), Path(out))))
        return

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
            result = subprocess.run([sys.executable, __file__, "--run", config, str(corpus),
                                     str(tokenizer_dir), str(args.dir / "out")],
                                    capture_output=True, text=True, env=env, check=True)
            rows.append((megabytes, config, json.loads(result.stdout.splitlines()[-1])))
            print(rows[-1], file=sys.stderr)
    print(f"{os.cpu_count()} CPUs; BPE 4096 (tiktoken); figures of one run each")
    print("| corpus | configuration | MB/s | MB/s per worker | vs 1 worker | peak RSS parent "
          "MB | peak RSS worker MB |\n|---|---|---:|---:|---:|---:|---:|")
    for megabytes, config, r in rows:
        one = next(x for m, c, x in rows if m == megabytes and c == "1 worker")
        workers = int(config.split()[0]) if config[0].isdigit() else None
        per = f"{r['mb_per_s'] / workers:.1f}" if workers else ""
        print(f"| {r['mb']:.0f} MB | {config} | {r['mb_per_s']:.1f} | {per} | "
              f"{r['mb_per_s'] / one['mb_per_s']:.2f}x | {r['parent_peak_mb']:.0f} | "
              f"{r['worker_peak_mb']:.0f} |")


if __name__ == "__main__":
    main()

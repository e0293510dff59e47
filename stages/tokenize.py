"""tokenize: train (or load) the tokenizer and encode both corpora into token memmaps.

The corpora are streamed from their shards: the pretrain corpus three times (a sample of at
most train_bytes for the BPE, the document hashes for the split, the encoding), the finetune
corpus twice, so memory does not grow with their size (the split keeps 8 bytes a document).
"""

import os
import time

from llmpipe import layout
from llmpipe.data.corpus import capped, read_texts
from llmpipe.data.params import TokenizeParams
from llmpipe.data.tokenization import (
    DocumentSplit,
    FastEncoder,
    SpreadSample,
    load_pretrained,
    train_bpe,
    write_corpus,
)
from llmpipe.io import atomic_dir, remove_stale_temporaries, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main

ENCODER_CHECK_DOCS = 200  # per corpus: tiktoken must reproduce the HF ids on them exactly


def main() -> None:
    shared, params = load_stage_params(TokenizeParams)
    for output in (layout.TOKENIZER, layout.TOKENS):
        remove_stale_temporaries(output)  # a run killed half way
    raw = {name: layout.raw_corpus(name) for name in layout.CORPORA}
    if params.tokenizer == "bpe":
        tokenizer = train_bpe(
            capped(read_texts(raw["pretrain"]), max_bytes=params.train_bytes),
            params.vocab_size,
            params.min_frequency,
        )
    else:
        tokenizer = load_pretrained(params.tokenizer, params.trust_remote_code)
    vocab_size = len(tokenizer)
    splits, samples = {}, {name: SpreadSample(ENCODER_CHECK_DOCS) for name in raw}
    for name, path in raw.items():
        splits[name] = DocumentSplit.fit(
            samples[name].watch(read_texts(path)), params.val_fraction, shared.seed, name
        )
    encoder = FastEncoder(tokenizer, sample=[d for s in samples.values() for d in s.documents])
    num_proc = params.num_proc or len(os.sched_getaffinity(0))  # the cores this process may use

    # Encode everything into temporary directories first: a failure leaves old outputs intact.
    metrics: dict = {
        "tokenizer": params.tokenizer,
        "vocab_size": vocab_size,
        "encoder": encoder.backend,
        "perf": {"processes": num_proc},
    }
    encoding_seconds, encoded_bytes = 0.0, 0
    with atomic_dir(layout.TOKENIZER) as tokenizer_tmp, atomic_dir(layout.TOKENS) as tokens_tmp:
        tokenizer.save_pretrained(tokenizer_tmp)
        for name, path in raw.items():
            started = time.perf_counter()
            meta = write_corpus(
                tokens_tmp / name,
                read_texts(path),
                splits[name],
                encoder,
                vocab_size,
                params.tokenizer,
                num_proc,
                progress_desc=f"encode {name}",
            )
            encoding_seconds += time.perf_counter() - started
            for split_name, info in meta["splits"].items():
                metrics[f"{name}_{split_name}_tokens"] = info["tokens"]
                metrics[f"{name}_{split_name}_documents"] = info["documents"]
            n_bytes = sum(info["bytes"] for info in meta["splits"].values())
            n_tokens = sum(info["tokens"] for info in meta["splits"].values())
            metrics[f"{name}_bytes_per_token"] = n_bytes / n_tokens
            encoded_bytes += n_bytes
    metrics["perf"]["encode_mb_per_s"] = encoded_bytes / encoding_seconds / 1e6
    write_metrics("tokenize", metrics)
    print(
        f"vocab {vocab_size} ({encoder.backend}, {num_proc} processes); "
        f"{metrics['perf']['encode_mb_per_s']:.1f} MB/s -> {layout.TOKENS}"
    )


if __name__ == "__main__":
    run_main(main)

"""tokenize: train (or load) the tokenizer and encode both corpora into token memmaps."""

import time

from llmpipe import layout
from llmpipe.corpus import read_texts
from llmpipe.io import atomic_dir, write_metrics
from llmpipe.params import TokenizeParams, load_stage_params
from llmpipe.stage import run_main
from llmpipe.tokenization import (
    FastEncoder,
    load_pretrained,
    split_by_document,
    spread_sample,
    train_bpe,
    write_corpus,
)

ENCODER_CHECK_DOCS = 200  # per corpus: tiktoken must reproduce the HF ids on them exactly


def main() -> None:
    shared, params = load_stage_params(TokenizeParams)
    corpora = {name: read_texts(layout.raw_corpus(name)) for name in layout.CORPORA}
    if params.tokenizer == "bpe":
        tokenizer = train_bpe(corpora["pretrain"], params.vocab_size, params.min_frequency)
    else:
        tokenizer = load_pretrained(params.tokenizer, params.trust_remote_code)
    vocab_size = len(tokenizer)
    sample = [doc for docs in corpora.values() for doc in spread_sample(docs, ENCODER_CHECK_DOCS)]
    encoder = FastEncoder(tokenizer, sample=sample)
    splits = {name: split_by_document(docs, params.val_fraction, shared.seed, name)
              for name, docs in corpora.items()}

    # Encode everything into temporary directories first: a failure leaves old outputs intact.
    metrics: dict = {"tokenizer": params.tokenizer, "vocab_size": vocab_size,
                     "encoder": encoder.backend, "perf": {}}
    started = time.perf_counter()
    encoded_bytes = 0
    with (atomic_dir(layout.TOKENIZER) as tokenizer_tmp,
          atomic_dir(layout.TOKENS) as tokens_tmp):
        tokenizer.save_pretrained(tokenizer_tmp)
        for name, split in splits.items():
            meta = write_corpus(tokens_tmp / name, split, encoder, vocab_size,
                                params.tokenizer, progress_desc=f"encode {name}")
            for split_name, info in meta["splits"].items():
                metrics[f"{name}_{split_name}_tokens"] = info["tokens"]
                metrics[f"{name}_{split_name}_documents"] = info["documents"]
            n_bytes = sum(info["bytes"] for info in meta["splits"].values())
            n_tokens = sum(info["tokens"] for info in meta["splits"].values())
            metrics[f"{name}_bytes_per_token"] = n_bytes / n_tokens
            encoded_bytes += n_bytes
    seconds = time.perf_counter() - started
    metrics["perf"]["encode_mb_per_s"] = encoded_bytes / seconds / 1e6
    write_metrics("tokenize", metrics)
    print(f"vocab {vocab_size} ({encoder.backend}); "
          f"{metrics['perf']['encode_mb_per_s']:.1f} MB/s -> {layout.TOKENS}")


if __name__ == "__main__":
    run_main(main)

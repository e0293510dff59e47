"""download: write the pretrain and finetune corpora to data/raw/ as JSONL."""

from llmpipe import layout
from llmpipe.corpus import load_documents, text_bytes, write_texts
from llmpipe.io import sha256_file, write_metrics
from llmpipe.params import DownloadParams, load_stage_params
from llmpipe.stage import run_main


def main() -> None:
    _, params = load_stage_params(DownloadParams)
    # Load every corpus before writing any, so a bad source leaves earlier outputs intact.
    documents = {name: load_documents(getattr(params, name)) for name in layout.CORPORA}
    metrics = {}
    for name, docs in documents.items():
        path = layout.raw_corpus(name)
        write_texts(path, docs)
        metrics[name] = {
            "source": getattr(params, name).source,
            "documents": len(docs),
            "bytes": text_bytes(docs),
            "sha256": sha256_file(path),
        }
        print(f"{name}: {len(docs)} documents, {metrics[name]['bytes']:,} bytes -> {path}")
    write_metrics("download", metrics)


if __name__ == "__main__":
    run_main(main)

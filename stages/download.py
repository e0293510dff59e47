"""download: stream the pretrain and finetune corpora into data/raw/<corpus>/ as JSONL shards."""

from llmpipe import layout
from llmpipe.data.corpus import open_documents, write_shards
from llmpipe.data.params import DownloadParams
from llmpipe.io import atomic_dir, remove_stale_temporaries, write_metrics
from llmpipe.params import load_stage_params
from llmpipe.stage import run_main


def main() -> None:
    from tqdm import tqdm

    _, params = load_stage_params(DownloadParams)
    remove_stale_temporaries(layout.RAW)  # a download killed half way starts again cleanly
    # Every source is opened (and checked) before anything is written, and the corpora replace
    # data/raw together: a bad source, or one that breaks half way, leaves the old ones intact.
    streams = {name: open_documents(getattr(params, name)) for name in layout.CORPORA}
    metrics = {}
    with atomic_dir(layout.RAW) as tmp:
        for name, docs in streams.items():
            stats = write_shards(
                tmp / layout.raw_corpus(name).name,
                tqdm(docs, desc=f"download {name}", unit=" docs", mininterval=1.0),
            )
            metrics[name] = {
                "source": getattr(params, name).source,
                "documents": stats.documents,
                "bytes": stats.bytes,
                "sha256": stats.sha256,
                "shards": stats.shards,
            }
            print(
                f"{name}: {stats.documents} documents, {stats.bytes:,} bytes in "
                f"{stats.shards} shard(s) -> {layout.raw_corpus(name)}"
            )
    write_metrics("download", metrics)


if __name__ == "__main__":
    run_main(main)

"""The llmpipe_cloze task's items, for the harness's `custom_dataset`: the JSONL file the
evaluate stage built from the current validation split (llmpipe.evaluation.cloze), named by
the task manager's metadata (`items_file`)."""

import json
from pathlib import Path


def load(items_file=None, **kwargs):
    import datasets

    if items_file is None:
        raise ValueError(
            "llmpipe_cloze: no items_file in the task metadata (the evaluate stage builds the "
            "items from the finetune corpus's validation split: dvc repro evaluate)"
        )
    lines = Path(items_file).read_text().splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})

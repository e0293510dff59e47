"""report: the report card (data/report/report.md, with its images) from evaluate's table and
samples, every stage's metrics and the training curves. It measures nothing."""

import json

from llmpipe import layout
from llmpipe.evaluation.report import write_report
from llmpipe.io import atomic_dir
from llmpipe.stage import run_main


def main() -> None:
    rows = json.loads(layout.EVALUATE_MODELS.read_text())
    samples = json.loads((layout.EVALUATE_SAMPLES / "samples.json").read_text())
    with atomic_dir(layout.REPORT) as tmp:
        write_report(tmp, rows, samples)
    print(f"report card -> {layout.REPORT / 'report.md'}")


if __name__ == "__main__":
    run_main(main)

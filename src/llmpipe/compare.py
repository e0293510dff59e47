"""What a pull request changes, in markdown: params diff, metrics diff and (optionally) the
plots diff, of the workspace against a revision. The CI comment shows exactly this.

    python -m llmpipe.compare main [--plots-out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys


def _dvc(*args: str) -> str:
    # The dvc of this environment, whether or not its bin directory is on PATH.
    result = subprocess.run([sys.executable, "-m", "dvc", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: dvc {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def comparison(rev: str, plots_out: str | None = None) -> str:
    lines = [
        f"## llmpipe: this change against `{rev}`",
        "",
        "### Params",
        "",
        _dvc("params", "diff", rev, "--md") or "No params changed.",
        "",
        "### Metrics",
        "",
        _dvc("metrics", "diff", rev, "--md", "--precision", "4") or "No metric changed.",
        "",
    ]
    if plots_out:
        _dvc("plots", "diff", rev, "--out", plots_out)
        lines += [
            "### Plots",
            "",
            f"Every plot, {rev} against this change: `{plots_out}/index.html`.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m llmpipe.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rev", nargs="?", default="main", help="revision to compare against")
    parser.add_argument("--plots-out", help="also render the plots diff (HTML) into this folder")
    args = parser.parse_args(argv)
    print(comparison(args.rev, args.plots_out))


if __name__ == "__main__":
    main()

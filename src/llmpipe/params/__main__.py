"""python -m llmpipe.params [FILE]: check every section of params.yaml (or FILE)."""

import argparse

from llmpipe.params import PARAMS_FILE
from llmpipe.pipeline import validate_all
from llmpipe.stage import run_main


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m llmpipe.params", description=__doc__)
    parser.add_argument("file", nargs="?", default=PARAMS_FILE, help="default: params.yaml")
    args = parser.parse_args()
    validate_all(args.file)
    print("params OK")


if __name__ == "__main__":
    run_main(main)

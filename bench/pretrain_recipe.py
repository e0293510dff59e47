"""Which pretraining recipe the embedded default can afford: side by side, on this machine, each
recipe's validation bits per byte against its wall time (dtype, optimizer, schedule, steps,
model and vocabulary size).

A recipe is one argument: space-separated `key=value` overrides of params.yaml's `pretrain`
section (dotted for the model: `model.n_embd=96`), and `tokenize.<key>=value` for a tokenizer
of another size (the corpus is tokenized again, into a temporary directory). The first recipe
is the line the others are compared with. Everything else is the workspace's params.yaml and
data (`dvc repro tokenize` first).

    python bench/pretrain_recipe.py "" "dtype=bfloat16" "dtype=bfloat16 optimizer=muon"

Bits per byte do not depend on the tokenizer, so recipes with other vocabularies compare.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from llmpipe import layout
from llmpipe.data.tokens import read_meta
from llmpipe.params import load_stage_params, read_params_file
from llmpipe.preset import set_dotted
from llmpipe.train.params import PretrainParams
from llmpipe.train.pretrain import PretrainPaths, pretrain

REPO = Path(__file__).resolve().parent.parent


def overrides(recipe: str) -> dict[str, dict]:
    """ "dtype=bfloat16 tokenize.vocab_size=2048" -> {"pretrain": {...}, "tokenize": {...}}."""
    out: dict[str, dict] = {"pretrain": {}, "tokenize": {}}
    for item in recipe.split():
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: not key=value")
        section, _, rest = key.partition(".")
        if section == "tokenize":
            out["tokenize"][rest] = yaml.safe_load(value)
        else:
            out["pretrain"][key] = yaml.safe_load(value)
    return out


def tokenized(workdir: Path, params: dict) -> tuple[Path, Path]:
    """The tokens and tokenizer of the workspace, or, where tokenize's params differ, of a run
    of the tokenize stage in `workdir` on the workspace's raw corpora."""
    if params["tokenize"] == read_params_file()["tokenize"]:
        return layout.tokens("pretrain"), layout.TOKENIZER
    (workdir / "data").mkdir(parents=True)
    os.symlink(REPO / layout.RAW, workdir / layout.RAW)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-m", "stages.tokenize"], cwd=workdir, env=env, check=True)
    return workdir / layout.tokens("pretrain"), workdir / layout.TOKENIZER


def run(recipe: str, seed: int) -> dict:
    params = read_params_file()
    for section, values in overrides(recipe).items():
        for key, value in values.items():
            set_dotted(params[section], key, value)
    with tempfile.TemporaryDirectory(prefix="pretrain_recipe_") as tmp:
        workdir = Path(tmp)
        tokens_dir, tokenizer_dir = tokenized(workdir / "tokenize", params)
        (workdir / "params.yaml").write_text(yaml.safe_dump(params))
        _, p = load_stage_params(PretrainParams, workdir / "params.yaml")
        metrics = pretrain(
            p,
            seed,
            PretrainPaths(
                tokens_dir=tokens_dir,
                tokenizer_dir=tokenizer_dir,
                model_dir=workdir / "model",
                checkpoint_dir=workdir / "checkpoint",
                live_dir=workdir / "live",
            ),
        )
        vocab = read_meta(tokens_dir)["vocab_size"]
    return {"recipe": recipe or "(params.yaml)", "vocab": vocab, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help='e.g. "" "dtype=bfloat16 optimizer=muon"')
    args = parser.parse_args()
    seed = read_params_file()["seed"]
    header = (
        "| recipe | vocab | parameters | tokens | tokens / parameter | val loss | "
        "val bits per byte | wall s | wall / first |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows, first_wall = [], None
    for recipe in args.recipes:
        m = run(recipe, seed)
        wall = m["perf"]["wall_s"]
        first_wall = first_wall or wall
        rows.append(
            f"| {m['recipe']} | {m['vocab']} | {m['parameters']:,} | {m['tokens_seen']:,} | "
            f"{m['tokens_per_parameter']:.2f} | {m['val_loss']:.3f} | "
            f"{m['val_bits_per_byte']:.3f} | {wall:.0f} | {wall / first_wall:.2f} |"
        )
        print(rows[-1], flush=True)
    print("\n" + header)
    print("\n".join(rows))


if __name__ == "__main__":
    main()

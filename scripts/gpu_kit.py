"""The smoke kit: a folder of wheels that, installed with --no-deps over the GPU image's own
stack, runs every stage of the `gpu-smoke` preset (scripts/gpu_check.sh installs it).

    python scripts/gpu_kit.py build --dest wheels            # make smoke-wheels: for the image
    python scripts/gpu_kit.py build --dest DIR --local       # for this interpreter (rehearsal)
    python scripts/gpu_kit.py check wheels                   # size, forbidden wheels, coverage

The list is requirements/gpu-kit.txt (binary wheels, downloaded for the target's Python and
platform) and requirements/gpu-kit-sdist.txt (pure-Python source distributions, built here),
plus llmpipe's own wheel. Everything comes from a clean pip cache and nothing transitive
(--no-deps): the image's torch, CUDA libraries, transformers' dependencies and so on stay as
they are. Standard library only, so that it runs with any python3.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "requirements" / "gpu-kit.txt"
KIT_SDIST = ROOT / "requirements" / "gpu-kit-sdist.txt"
IMAGE = ROOT / "requirements" / "gpu-image.txt"

MAX_BYTES = 48 * 2**20  # 64 MiB travel per call to the GPU machine, the working tree included
# The image brings these, built for its CUDA; a wheel of them would be GBs and the wrong build.
# (nvidia-ml-py, NVML's pure-Python bindings, is no CUDA library.)
FORBIDDEN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-(?!ml-py$).*)$")
TARGET_PYTHON = "3.12"
TARGET_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
)

# Dependencies of pyproject.toml that the kit leaves out, and why: the kit must stay under
# MAX_BYTES and the smoke run's stages do not import them.
NOT_CARRIED = {
    **dict.fromkeys(
        (
            "fastapi",
            "starlette",
            "uvicorn",
            "httptools",
            "uvloop",
            "sse-starlette",
            "annotated-doc",
        ),
        "the server (llmpipe.serve) is no stage; the smoke run does not start it",
    ),
    "vl-convert-python": "the report card's images (a 33 MB wheel): without it the report is "
    "written without them and says so",
    "pyparsing": "DVC's parser of ${...} in dvc.yaml, imported only when DVC reads one: the "
    "smoke run runs the stages without DVC",
    **dict.fromkeys(
        ("pygit2", "asyncssh", "cryptography", "cffi", "pycparser"),
        "DVC's libgit2 and ssh backends: the smoke run uses no git and no remote",
    ),
    **dict.fromkeys(
        (
            "celery",
            "kombu",
            "billiard",
            "vine",
            "amqp",
            "click-didyoumean",
            "click-plugins",
            "click-repl",
            "prompt-toolkit",
            "wcwidth",
        ),
        "DVC's experiment-queue workers (dvc-task): the smoke run queues nothing",
    ),
    # celery 5.7 pins python-dateutil 2.9, which needs six; the kit carries python-dateutil 4
    "six": "python-dateutil 2.9's dependency, there only where celery (not carried) pins it; "
    "the kit's python-dateutil 4 needs none",
    "hf-xet": "the hub's download protocol (no network there); the image has its own",
    "tokenizers": "the image's transformers 5.17 already needs >= 0.23.1, all llmpipe needs",
}


def requirement_lines(path: Path) -> list[str]:
    return [
        line.split("#", 1)[0].strip()
        for line in path.read_text().splitlines()
        if line.split("#", 1)[0].strip()
    ]


def distribution(spec: str) -> str:
    """The canonical distribution name of a requirement or wheel name (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0]).lower()


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    if subprocess.run(command).returncode != 0:
        sys.exit(f"gpu_kit: failed: {' '.join(command)}")


def build(dest: Path, local: bool, python_version: str, platforms: tuple[str, ...]) -> None:
    """dest/: the kit's wheels, made afresh (an old folder is replaced only when all is done)."""
    with tempfile.TemporaryDirectory(prefix="gpu-kit-") as tmp:
        wheels = Path(tmp) / "wheels"
        target = (
            []
            if local
            else [
                "--python-version",
                python_version,
                *[arg for p in platforms for arg in ("--platform", p)],
            ]
        )
        # No cache: what the folder holds is what the registry serves now, not an old copy.
        pip(
            "download",
            "--no-deps",
            "--no-cache-dir",
            "--only-binary=:all:",
            "--quiet",
            "--dest",
            str(wheels),
            *target,
            "-r",
            str(KIT),
        )
        pip(
            "wheel",
            "--no-deps",
            "--no-cache-dir",
            "--quiet",
            "--wheel-dir",
            str(wheels),
            "-r",
            str(KIT_SDIST),
            str(ROOT),
        )
        problems = check(wheels)
        if problems:
            sys.exit("gpu_kit: " + "; ".join(problems))
        if dest.exists():
            shutil.rmtree(dest)
        shutil.move(str(wheels), dest)
    print(f"{dest}: {len(list(dest.glob('*.whl')))} wheels, {size_mib(dest):.1f} MiB")


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.iterdir()) / 2**20


def check(folder: Path) -> list[str]:
    """What is wrong with a kit folder: too big, a forbidden wheel, a sdist, a wheel missing."""
    problems = []
    wheels = {distribution(f.name.split("-", 1)[0]): f for f in folder.glob("*.whl")}
    total = sum(f.stat().st_size for f in folder.iterdir())
    if total > MAX_BYTES:
        problems.append(f"{folder}: {total / 2**20:.1f} MiB, more than {MAX_BYTES / 2**20:.0f}")
    problems += [
        f"{f.name}: the image brings it" for name, f in wheels.items() if FORBIDDEN.match(name)
    ]
    problems += [f"{f.name}: not a wheel" for f in folder.iterdir() if f.suffix != ".whl"]
    wanted = [distribution(s) for s in requirement_lines(KIT) + requirement_lines(KIT_SDIST)]
    problems += [f"{name}: no wheel" for name in [*wanted, "llmpipe"] if name not in wheels]
    return problems


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_kit.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="download and build the kit's wheels")
    build_parser.add_argument("--dest", type=Path, default=ROOT / "wheels")
    build_parser.add_argument(
        "--local", action="store_true", help="for this interpreter and platform (the rehearsal)"
    )
    build_parser.add_argument("--python-version", default=TARGET_PYTHON)
    build_parser.add_argument(
        "--platform",
        action="append",
        dest="platforms",
        help=f"repeatable (default: {', '.join(TARGET_PLATFORMS)})",
    )
    check_parser = commands.add_parser("check", help="check a kit folder")
    check_parser.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(
            args.dest.resolve(),
            args.local,
            args.python_version,
            tuple(args.platforms or TARGET_PLATFORMS),
        )
    else:
        problems = check(args.folder)
        if problems:
            sys.exit("gpu_kit: " + "; ".join(problems))
        print(f"{args.folder}: ok, {size_mib(args.folder):.1f} MiB")


if __name__ == "__main__":
    main()

"""The smoke kit (scripts/gpu_kit.py, requirements/gpu-kit.txt): what the GPU image lacks, as
wheels that install with --no-deps over the image's own stack. Here the image is stood in for by
a virtualenv of requirements/gpu-image.txt with the pinned CPU torch (as `make gpu-rehearsal`
builds it), and the kit is built for this machine's Python (the GPU's is 3.12): the same
versions, other binary tags."""

import importlib.util
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run
from llmpipe import smoke

spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)
spec = importlib.util.spec_from_file_location("gpu_kit", ROOT / "scripts" / "gpu_kit.py")
gpu_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_kit)


def installed(python) -> dict[str, str]:
    out = subprocess.run(
        [str(python), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {gpu_kit.distribution(d["name"]): d["version"] for d in json.loads(out)}


def closure(names: set[str]) -> set[str]:
    """The distributions these need, transitively, as installed in this venv."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen, todo = set(), list(names)
    while todo:
        name = gpu_kit.distribution(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def test_the_smoke_runner_and_the_kit_leave_out_the_same_things():
    assert set(smoke.NOT_FOR_STAGES) <= set(gpu_kit.NOT_CARRIED)
    carried = {gpu_kit.distribution(s) for s in gpu_kit.requirement_lines(gpu_kit.KIT)}
    assert not carried & set(gpu_kit.NOT_CARRIED)
    assert not any(gpu_kit.FORBIDDEN.match(name) for name in carried)
    assert gpu_kit.FORBIDDEN.match("nvidia-cublas-cu12") and gpu_kit.FORBIDDEN.match("triton")


def test_a_kit_folder_that_breaks_the_rules_is_refused(tmp_path):
    (tmp_path / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    (tmp_path / "big-1.0.tar.gz").write_bytes(b"x" * (gpu_kit.MAX_BYTES + 1))
    problems = gpu_kit.check(tmp_path)
    assert any("MiB, more than 48" in p for p in problems)
    assert any(p.startswith("torch-2.11.0") and "the image brings it" in p for p in problems)
    assert "big-1.0.tar.gz: not a wheel" in problems
    assert "trl: no wheel" in problems and "llmpipe: no wheel" in problems


@pytest.mark.slow
def test_the_kit_installs_over_the_image_stack_and_imports(tmp_path):
    image = tmp_path / "image"
    run([sys.executable, "-m", "venv", str(image)], tmp_path)
    python = image / "bin" / "python"
    uv = (
        [str(ROOT / ".venv" / "bin" / "uv")]
        if (ROOT / ".venv/bin/uv").exists()
        else [sys.executable, "-m", "uv"]
    )
    run(
        [
            *uv,
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            "torch==2.13.0",
            "-r",
            str(gpu_kit.IMAGE),
        ],
        tmp_path,
    )
    run([str(python), "-m", "ensurepip"], tmp_path)

    # Every dependency of llmpipe's is carried, on the image at a version it accepts, or left
    # out on purpose (NOT_CARRIED); torch's own stack is the image's.
    on_image = installed(python)
    carried = {
        gpu_kit.distribution(s)
        for s in gpu_kit.requirement_lines(gpu_kit.KIT)
        + gpu_kit.requirement_lines(gpu_kit.KIT_SDIST)
    }
    needed = closure({gpu_kit.distribution(n) for n in smoke.requirements()}) - closure({"torch"})
    assert needed - carried - set(on_image) - set(gpu_kit.NOT_CARRIED) == set()

    wheels, target = tmp_path / "wheels", tmp_path / "kit"
    run(
        [
            sys.executable,
            str(ROOT / "scripts" / "gpu_kit.py"),
            "build",
            "--local",
            "--dest",
            str(wheels),
        ],
        tmp_path,
    )
    assert not any(
        gpu_kit.FORBIDDEN.match(gpu_kit.distribution(w.name.split("-")[0]))
        for w in wheels.glob("*.whl")
    )
    # As scripts/gpu_check.py installs it.
    run(gpu_check.kit_install_command(python, wheels, target), tmp_path)
    # From an empty folder (no repository on the path), against the image venv's torch.
    result = run(
        [
            str(python),
            "-c",
            "import llmpipe, trl, dvc, dvclive, torch; "
            "from dvclive import Live; from trl import GRPOTrainer; "
            "print(llmpipe.__file__, trl.__file__, torch.__file__)",
        ],
        tmp_path,
        PYTHONPATH=str(target),
    )
    llmpipe_file, trl_file, torch_file = result.stdout.split()
    assert llmpipe_file.startswith(str(target)) and trl_file.startswith(str(target))
    assert torch_file.startswith(str(image))

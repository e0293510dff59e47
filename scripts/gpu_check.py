"""The GPU check: what one lent GPU machine is asked, prepared so that none of its minutes go to
set-up (scripts/gpu_check.sh runs this with the machine's python3).

    scripts/gpu_check.sh                    # on the GPU machine: results in $OUT/gpu_check.json
    scripts/gpu_check.sh --dry-run          # the same code on a CPU at micro shapes
    scripts/gpu_check.sh --wheels DIR       # the kit's folder (default: wheels/, if present)
    scripts/gpu_check.sh --parts environment,kit,mfu   # then --parts kit,smoke: two calls

Four parts, in this order, each in its own processes under time limits (TIME_LIMITS_S:
at most about 11 minutes in all: two calls of the device tool), and the JSON rewritten after each,
so that a run cut short still returns what it measured; `--parts` reruns some of them (the kit
is installed whenever the smoke run is asked for: it runs over it):
1. environment: driver, CUDA, torch, the GPU;
2. kit: installs the smoke kit (`make smoke-wheels`) with `pip install --no-index --no-deps
   --target` over the machine's own stack, and imports llmpipe, trl, dvc, dvclive from it;
3. mfu: GPT-2 124M bf16 training, compiled, on synthetic tokens: tokens/s, MFU, and the time to
   GPT-2's 10 B-token target on 8 GPUs (bench/gpt2_mfu.py);
4. smoke: the `gpu-smoke` preset through every stage (llmpipe.smoke): finetune, reward model,
   GRPO, REINFORCE and int8 on the GPU; wall time per stage, pretrain's and int8's figures.
Standard library only: it runs before the kit is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Seconds per step on the GPU (the MFU figure before the smoke run, which may be cut short and
# still reports the stages it finished) and in the CPU dry run, which runs on small machines
# (2 cores) at micro shapes. Measured on an H200 (bench/README.md): the first import from the kit
# compiles its bytecode (over 20 s on a cold machine; the later processes reuse it), the MFU part
# took 48-66 s, and the smoke chain 326 s for its first 12 stages (15-20 s of each stage is
# starting a process: imports, CUDA, compilation); it has 16 now. In all 675 s: more than one
# 10-minute call of the device tool, so a session runs it as two calls (docs/presets-and-gpu.md):
# --parts environment,kit,mfu (at most 195 s), then --parts kit,smoke (at most 570 s).
TIME_LIMITS_S = {"environment": 15, "kit": 45, "imports": 45, "mfu": 90, "smoke": 480}
PARTS = ("environment", "kit", "mfu", "smoke")
DRY_RUN_TIME_LIMITS_S = {"environment": 60, "kit": 300, "imports": 120, "mfu": 120, "smoke": 900}
ENVIRONMENT = r"""
import json, platform, subprocess, torch
info = {"python": platform.python_version(), "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    info["nvidia_smi"] = smi.stdout.strip().splitlines() or smi.stderr.strip()
except (OSError, subprocess.TimeoutExpired) as e:
    info["nvidia_smi"] = f"not run: {e}"
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0),
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                bf16=torch.cuda.is_bf16_supported(),
                memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1))
else:
    from llmpipe.runtime import cuda_unusable_reason, nvidia_gpu_present
    info["cuda_unusable"] = cuda_unusable_reason() if nvidia_gpu_present() else "no NVIDIA GPU"
print(json.dumps(info))
"""
KIT_IMPORTS = r"""
import importlib.metadata as md, json
import llmpipe, trl, dvc, dvclive, datasets, transformers, peft, accelerate
names = ("llmpipe", "transformers", "trl", "datasets", "dvc", "dvclive", "peft", "accelerate",
         "torch", "torchao")
versions = {}
for name in names:
    try:
        versions[name] = md.version(name)
    except md.PackageNotFoundError:
        versions[name] = None
print(json.dumps(versions))
"""


class Check:
    """The results, written to out/gpu_check.json (atomically) after every part."""

    def __init__(self, out: Path, dry_run: bool):
        self.out, self.path = out, out / "gpu_check.json"
        self.limits = DRY_RUN_TIME_LIMITS_S if dry_run else TIME_LIMITS_S
        self.results: dict = {
            "dry_run": dry_run,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "time_limits_s": self.limits,
            "parts": {},
        }
        out.mkdir(parents=True, exist_ok=True)

    def write(self) -> None:
        with tempfile.NamedTemporaryFile("w", dir=self.out, delete=False, suffix=".tmp") as f:
            json.dump(self.results, f, indent=2)
            f.write("\n")
        os.replace(f.name, self.path)

    def run(self, part: str, command: list[str], env: dict, log: Path) -> dict:
        """One part's command under its time limit, its output to a log beside the JSON (and the
        tail on the terminal). A part over time is killed with its process group."""
        limit = self.limits[part]
        print(f"\n== {part} (at most {limit} s): {shlex.join(command)}", flush=True)
        started = time.perf_counter()
        with open(log, "w") as output:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                code = process.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                code = None
        record = {
            "wall_s": round(time.perf_counter() - started, 1),
            "exit_code": code,
            "timed_out": code is None,
            "log": log.name,
        }
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print("\n".join(tail), flush=True)
        if code != 0:
            record["log_tail"] = tail
        return record

    def part(self, name: str, record: dict) -> dict:
        self.results["parts"][name] = record
        self.write()
        status = "timed out" if record.get("timed_out") else f"exit {record.get('exit_code')}"
        print(f"-- {name}: {status}, {record.get('wall_s')} s -> {self.path}", flush=True)
        return record


def kit_install_command(python: str | Path, wheels: Path, target: Path) -> list[str]:
    """The kit over the machine's own stack: offline, exactly these wheels, into a folder of its
    own. No bytecode at install (time): each module is compiled once, on its first import, into
    the kit's folder, and the later processes reuse it."""
    return [
        str(python),
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--quiet",
        "--no-compile",
        "--target",
        str(target),
        *map(str, sorted(Path(wheels).resolve().glob("*.whl"))),
    ]


def last_json_line(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="the CPU at micro shapes: the same code, rehearsed"
    )
    parser.add_argument("--wheels", type=Path, help="the kit (default: wheels/ if present)")
    parser.add_argument(
        "--out", type=Path, help="where the JSON and logs go (default: $OUT, else runs/gpu_check)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="the kit's install and the smoke run's "
        "outputs, large (default: a temporary folder, outside --out)",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which parts, comma-separated (default: all of {','.join(PARTS)})",
    )
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if unknown := parts - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))} (known: {', '.join(PARTS)})")
    out = (args.out or Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_check")).resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="llmpipe-gpu-check-"))).resolve()
    wheels = args.wheels or (ROOT / "wheels" if (ROOT / "wheels").is_dir() else None)
    check = Check(out, args.dry_run)
    python = sys.executable
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")

    if "environment" in parts:
        environment = check.run(
            "environment", [python, "-c", ENVIRONMENT], env, out / "environment.log"
        )
        environment.update(last_json_line(out / "environment.log") or {})
        check.part("environment", environment)

    if parts & {"kit", "smoke"}:  # the smoke run runs over the kit
        if wheels is None:
            check.part(
                "kit",
                {
                    "skipped": "no kit folder: build one with `make smoke-wheels` (the "
                    "machine's own packages are used as they are)"
                },
            )
        else:
            kit = work / "kit"
            record = check.run(
                "kit", kit_install_command(python, wheels, kit), env, out / "kit.log"
            )
            # The tree's own llmpipe first, then the kit over the machine's site-packages.
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(kit)])
            if record["exit_code"] == 0:
                imports = check.run(
                    "imports", [python, "-c", KIT_IMPORTS], env, out / "imports.log"
                )
                record.update(
                    imports=last_json_line(out / "imports.log"),
                    imports_exit_code=(
                        "timed out" if imports["timed_out"] else imports["exit_code"]
                    ),
                )
            check.part("kit", record)

    if "mfu" in parts:
        mfu_json = out / "mfu.json"
        mfu_json.unlink(missing_ok=True)  # no figures of an earlier run read back as this one's
        record = check.run(
            "mfu",
            [
                python,
                "bench/gpt2_mfu.py",
                "--json",
                str(mfu_json),
                *(["--micro"] if args.dry_run else []),
            ],
            env,
            out / "mfu.log",
        )
        if mfu_json.exists():
            record["figures"] = json.loads(mfu_json.read_text())
        check.part("mfu", record)

    if "smoke" in parts:
        run_dir = work / "smoke"
        shutil.rmtree(run_dir, ignore_errors=True)  # the same for the smoke run's summary
        record = check.run(
            "smoke",
            [
                python,
                "-m",
                "llmpipe.smoke",
                "gpu-smoke",
                "--run-dir",
                str(run_dir),
                *(["--cpu-rehearsal"] if args.dry_run else []),
            ],
            env,
            out / "smoke.log",
        )
        record.update(smoke_figures(run_dir))
        check.part("smoke", record)

    failed = [
        name
        for name, r in check.results["parts"].items()
        if r.get("exit_code") not in (0, None)
        or r.get("timed_out")
        or r.get("imports_exit_code") not in (0, None)
    ]
    check.results["failed_parts"] = failed
    check.write()
    print(f"\n{'failed: ' + ', '.join(failed) if failed else 'every part passed'} -> {check.path}")
    return 1 if failed else 0


def smoke_figures(run_dir: Path) -> dict:
    """What the smoke run wrote, read back even when it was cut short: its per-stage table, and
    the figures a GPU run is asked for (pretrain's rate and MFU, int8's speed)."""
    figures: dict = {}
    summary = run_dir / "smoke.json"
    if summary.exists():
        figures["summary"] = json.loads(summary.read_text())
    quantize = run_dir / "metrics" / "quantize.json"
    if quantize.exists():
        figures["quantize"] = json.loads(quantize.read_text())
    return figures


if __name__ == "__main__":
    sys.exit(main())

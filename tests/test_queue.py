"""The GPU-aware queue on the CPU with pretend devices: two experiments queued with
`dvc exp run --queue` run at once, one per device group, each seeing only its own
CUDA_VISIBLE_DEVICES, and both appear in `dvc exp show` with their metrics, as DVC's own queue
leaves them."""

import json
import sys

import pytest

from conftest import run
from llmpipe import seeds
from llmpipe.launch.queue import QueueError, device_groups


@pytest.mark.parametrize(
    ("devices", "per", "groups"),
    [("0,1,2,3", 1, ["0", "1", "2", "3"]), ("0,1,2,3", 2, ["0,1", "2,3"]), ("7", 1, ["7"])],
)
def test_devices_split_into_groups(devices, per, groups):
    assert device_groups(devices, per) == groups


@pytest.mark.parametrize(
    ("devices", "per", "message"),
    [
        ("0,1,2", 2, "--per-experiment: 3 devices do not divide into groups of 2"),
        ("0,0", 1, "--devices: '0,0' is not a list of distinct device ids"),
        ("", 1, "--devices: '' is not a list"),
    ],
)
def test_a_bad_device_list_is_a_one_line_error(devices, per, message):
    with pytest.raises(QueueError, match=f"^{message}"):
        device_groups(devices, per)


PROBE = """import json, os, pathlib, time
from ruamel.yaml import YAML
params = YAML(typ="safe").load(open("params.yaml"))
x = params["x"]
# A rendezvous, not a clock: each experiment leaves a mark and waits for the other's. Run one
# after the other, the first waits in vain (a busy machine can start two experiments seconds
# apart, so comparing start and end times was flaky).
met = None
if params["meet"]:
    meeting = pathlib.Path(MEETING)
    meeting.mkdir(exist_ok=True)
    (meeting / str(x)).touch()
    deadline = time.monotonic() + 90
    while len(list(meeting.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    met = len(list(meeting.iterdir())) >= 2
json.dump({"x": x, "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "met": met},
          open("probe.json", "w"))
"""


@pytest.fixture
def probe_project(tmp_path):
    """A DVC project of one stage that records the devices it saw: DVC's queue machinery, in
    seconds (the pipeline's own stages take minutes; the executor tests cover them)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "probe.py").write_text(PROBE.replace("MEETING", repr(str(tmp_path / "meeting"))))
    (repo / "params.yaml").write_text("x: 1\nmeet: false\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n  probe:\n    cmd: python probe.py\n    deps: [probe.py]\n"
        "    params: [x, meet]\n    metrics:\n      - probe.json:\n          cache: false\n"
    )
    for command in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "config", "user.email", "test@llmpipe.local"],
        ["git", "config", "user.name", "llmpipe test"],
        ["dvc", "init", "-q"],
        ["dvc", "repro", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-q", "-m", "probe"],
    ):
        run(command, repo)
    return repo


@pytest.mark.slow
def test_queued_experiments_run_at_once_one_per_device_group(probe_project):
    repo = probe_project
    for name, x in (("queued-a", 2), ("queued-b", 3)):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"x={x}", "-S", "meet=true"], repo)
    out = run([sys.executable, "-m", "llmpipe.launch.queue", "--devices", "0,1"], repo).stdout
    assert "2 queued experiments on 2 device groups" in out
    assert "queued-a: done" in out and "queued-b: done" in out, out

    shown = dict(seeds._experiments(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)))
    probes = {
        name: shown[name]["metrics"]["probe.json"]["data"] for name in ("queued-a", "queued-b")
    }
    assert {name: probe["x"] for name, probe in probes.items()} == {"queued-a": 2, "queued-b": 3}
    assert sorted(probe["devices"] for probe in probes.values()) == ["0", "1"]
    assert all(probe["met"] is True for probe in probes.values())  # each saw the other running
    assert "Queued" not in run(["dvc", "queue", "status"], repo).stdout

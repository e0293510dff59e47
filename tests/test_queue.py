"""The GPU-aware queue on the CPU with pretend devices: two experiments queued with
`dvc exp run --queue` run at once, one per device group, each seeing only its own
CUDA_VISIBLE_DEVICES (evaluate records it in its perf), and both appear in `dvc exp show` with
their metrics, as DVC's own queue leaves them."""

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


@pytest.mark.slow
def test_queued_experiments_run_one_per_device_group(reproduced_project):
    repo = reproduced_project
    for name, repeats in (("queued-a", 2), ("queued-b", 3)):
        run(["dvc", "exp", "run", "--queue", "-n", name, "-S", f"evaluate.repeats={repeats}"], repo)
    out = run([sys.executable, "-m", "llmpipe.launch.queue", "--devices", "0,1"], repo).stdout
    assert "2 queued experiments on 2 device groups" in out
    assert "queued-a: done" in out and "queued-b: done" in out, out

    shown = dict(seeds._experiments(json.loads(run(["dvc", "exp", "show", "--json"], repo).stdout)))
    seen = {}
    for name, repeats in (("queued-a", 2), ("queued-b", 3)):
        data = shown[name]
        assert data["params"]["params.yaml"]["data"]["evaluate"]["repeats"] == repeats
        evaluate = data["metrics"]["metrics/evaluate.json"]["data"]
        assert evaluate["finetune"]["val_perplexity_finetune"] > 1
        seen[name] = {perf["visible_devices"] for perf in evaluate["perf"].values()}
    assert sorted(seen.values(), key=sorted) == [{"0"}, {"1"}], seen
    assert "Queued" not in run(["dvc", "queue", "status"], repo).stdout

"""The Ray executor on a local two-CPU Ray cluster shared by these tests: a run equals the in-process run, a worker
killed in the middle of a child is retried and changes nothing, a killed driver resumes to the same result."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import TINY_ROOT, make_run
from test_resume import ONE_THREAD, _command, _start, _write_tasks, dump

from munet.cli import main
from munet.config import RunConfig
from munet.distributed.ray_executor import FAULT_ENV
from munet.errors import ConfigError
from munet.storage.store import Store

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_thread", "ray_cluster")]

SETTINGS = {"seed": 5, "mutation_prob": 0.4, "inherit_momentum": True, "stop_margin": 0.05}
EXECUTOR_KEYS = ("executor", "ray_address")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for every test of the session (starting one takes seconds)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")  # never a running one
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory) -> dict:
    """The in-process run the Ray runs must equal, as its store holds it (the executor keys left out)."""
    out = tmp_path_factory.mktemp("local") / "run"
    make_run(out, **SETTINGS)
    return _results(out)


def _results(out) -> dict:
    stored = dump(out)
    stored["meta"]["config"] = {k: v for k, v in stored["meta"]["config"].items() if k not in EXECUTOR_KEYS}
    return stored


def test_ray_run_equals_the_local_run(tmp_path, local_run):
    make_run(tmp_path / "ray", executor="ray", **SETTINGS)
    ray_run = _results(tmp_path / "ray")
    assert len(ray_run["paths"]) > 4 and ray_run == local_run


def test_worker_killed_in_a_child_is_retried_and_changes_nothing(tmp_path, local_run, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, str(marker))
    make_run(tmp_path / "ray", executor="ray", **SETTINGS)
    assert marker.exists()  # a worker died
    assert _results(tmp_path / "ray") == local_run


def test_driver_killed_then_resumed_equals_the_local_run(tmp_path, ray_cluster, capsys):
    """``munet run --executor ray`` SIGKILLed in the middle of a generation, then ``munet resume`` on the cluster
    ends as the uninterrupted in-process run does."""
    tasks = _write_tasks(tmp_path)
    assert main(_command(tasks, tmp_path / "ref")[3:]) == 0
    out = tmp_path / "run"
    proc = _start(_command(tasks, out) + ["--executor", "ray", "--ray-address", ray_cluster], {})
    generations = 0
    for line in proc.stdout:
        generations += "| gen " in line
        if generations == 2:  # the third generation's children are on the cluster now
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    with Store.open(out) as store:
        assert store.get("plan")["done"] < 2
    done = subprocess.run([sys.executable, "-m", "munet", "resume", str(out), "--ray-address", ray_cluster],
                          capture_output=True, text=True,
                          timeout=300, env={**os.environ, **ONE_THREAD})
    assert done.returncode == 0, done.stdout + done.stderr
    assert _results(out) == _results(tmp_path / "ref")


def test_a_child_asking_for_more_cpus_than_a_node_has_is_refused(tmp_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["run", "--root", TINY_ROOT, "--tasks", "npz:" + _write_tasks(tmp_path)[0].split(":", 1)[1],
                     "--depth", "1", "--image-size", "16", "--max-image-size", "16", "--children-per-task", "1",
                     "--executor", "ray", "--threads", "3", "--out", str(tmp_path / "run")])
    finally:
        torch.set_num_threads(threads)
    assert code == 2 and "asks for 3 CPUs" in capsys.readouterr().err


def test_ray_address_without_the_ray_executor_is_refused():
    with pytest.raises(ConfigError, match="executor ray"):
        RunConfig(ray_address="10.0.0.1:6379").validate()

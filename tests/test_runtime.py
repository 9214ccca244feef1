"""Determinism you can see (issue 13): the thread count is a key, applied and recorded with the device and dtype; a
resumed session with another thread count warns that results may differ in the last digits."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import Crash, crashing_store, make_run

from munet.config import RunConfig
from munet.errors import ConfigError
from munet.runner import OPERATIONAL_KEYS, resume
from munet.storage.store import Store

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_are_applied_and_recorded_with_device_and_dtype(tmp_path, restore_threads):
    torch.set_num_threads(1)
    make_run(tmp_path / "run", threads=2, children_per_task=2)
    assert torch.get_num_threads() == 2
    with Store.open(tmp_path / "run") as store:
        assert store.get("config")["threads"] == 2
        runtime = store.get("runtime")
    assert runtime["threads"] == 2 and runtime["device"] == "cpu" and runtime["dtype"] == "float32"
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"threads": 2' in summary


def test_resume_with_another_thread_count_warns_but_goes_on(tmp_path, caplog, restore_threads):
    out = tmp_path / "run"
    with pytest.raises(Crash):  # an unfinished run, so that each resume below computes
        make_run(out, crashing_store("commit", 3), threads=1, children_per_task=2)
    with caplog.at_level(logging.WARNING, logger="munet"), pytest.raises(Crash):
        resume(str(out), {"threads": 1}, store_class=crashing_store("commit", 2))
    assert "last digits" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="munet"):
        summary = resume(str(out), {"threads": 2})  # operational: allowed, not refused
    assert "computed with threads 1 (this session: 2): results may differ in the last digits" in caplog.text
    assert "resume with --threads 1 to match" in caplog.text
    assert summary["runtime"]["threads"] == 2
    # a complete run resumed computes nothing: its summary keeps what the run was computed with
    assert resume(str(out), {"threads": 1})["runtime"]["threads"] == 2


def test_threads_is_an_operational_key_checked_for_range():
    assert "threads" in OPERATIONAL_KEYS
    with pytest.raises(ConfigError, match="threads must be >= 0, got -1"):
        RunConfig(threads=-1).validate()
    assert RunConfig().threads == 0  # torch's own setting: all cores unless the process changed it

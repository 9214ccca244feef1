"""``benchmarks/levers.py``: paired lever comparisons on child random streams, resumable units, the paired table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import benchmark_module

from munet.config import RunConfig


@pytest.fixture(scope="module")
def levers():
    return benchmark_module("levers.py")


def _result(accs: list[float], params: float = 1e6) -> dict:
    return {"tasks": {f"t{i}": {"test_acc": a, "accounted": params} for i, a in enumerate(accs)}, "images": 100}


def test_the_arms_differ_only_by_the_lever_and_both_run_on_child_streams(levers, tmp_path):
    base = RunConfig()
    default = levers.arm_config(base, {}, 2, 1, tmp_path)
    lever = levers.arm_config(base, {"remove_layers": "false", "max_seeds": "0"}, 2, 1, tmp_path)
    assert default.random_streams == lever.random_streams == "child" and default.seed == lever.seed == 2
    changed = {k for k, v in default.to_dict().items() if lever.to_dict()[k] != v}
    assert changed == {"remove_layers", "max_seeds", "out"}
    assert Path(lever.out).name == "max_seeds=0+remove_layers=false__seed2"
    assert Path(default.out).name == "default__seed2"


def test_an_arm_is_named_by_its_checked_values_so_two_spellings_share_its_units(levers, tmp_path):
    base = RunConfig()
    spellings = [levers.parse_lever(pairs, base) for pairs in (["remove_layers=False", "mutation_prob=0"],
                                                               ["mutation-prob=0.0", "remove_layers=false"])]
    assert {levers.arm_name(lever) for lever in spellings} == {"mutation_prob=0.0+remove_layers=false"}
    lever = levers.parse_lever(["root=file:roots/x.pt"], base)
    assert levers.arm_name(lever) == "root=file:roots-x.pt"
    assert Path(levers.arm_config(base, lever, 0, 1, tmp_path).out).parent == tmp_path / "runs"


def test_the_paired_difference_is_the_mean_of_the_seeds_differences_with_their_standard_error(levers):
    lever = {"k": "v"}
    results = {0: {"default": _result([0.8, 1.0]), "k=v": _result([0.9, 1.0])},      # +0.05
               1: {"default": _result([0.8, 0.8]), "k=v": _result([0.8, 0.8])},      # 0
               2: {"default": _result([0.9, 0.9]), "k=v": _result([0.95, 0.95])},    # +0.05
               3: {"default": _result([0.5, 0.5])}}                                  # one arm only: left out
    mean, se = levers.paired([0.9, 0.8, 0.9], [0.95, 0.8, 0.95])
    assert mean == pytest.approx(1 / 30) and se == pytest.approx(0.05 / math.sqrt(3) / math.sqrt(3))
    table = levers.format_report(lever, results)
    assert "3 seed(s): default 0.8667, k=v 0.9000; paired difference +3.33 points (+5.00 / +0.00 / +5.00)" in table
    assert f"standard error {100 * se:.2f}" in table
    assert "per task (points): t0 +5.00, t1 +1.67" in table
    assert "\n   3  " not in table
    assert "no seed has both arms" in levers.format_report(lever, {0: {"default": _result([0.5])}})


def test_finished_units_are_reused_and_only_missing_arms_run(levers, tmp_path, monkeypatch, capsys):
    from conftest import tiny_config
    from quality_modes import Mode

    mode = Mode("tiny", tiny_config(tmp_path / "unused"), (1.0,), (), (), "tiny")
    monkeypatch.setattr(levers, "load_mode", lambda name: mode)
    monkeypatch.setattr(levers, "mode_names", lambda: ["tiny"])
    argv = ["--set", "mutation_prob=0", "--seeds", "0", "--mode", "tiny", "--threads", "1", "--results", str(tmp_path)]
    assert levers.main(argv) == 0
    first = capsys.readouterr().out
    units = tmp_path / "tiny" / "units"
    stored = {p.stem: json.loads(p.read_text()) for p in units.glob("*.json")}
    assert set(stored) == {"default__seed0", "mutation_prob=0.0__seed0"}
    assert {u["settings"]["random_streams"] for u in stored.values()} == {"child"}
    assert stored["mutation_prob=0.0__seed0"]["settings"]["mutation_prob"] == 0

    def no_run(*args, **kwargs):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr(levers, "run_munet", no_run)
    assert levers.main(argv) == 0
    again = capsys.readouterr().out
    assert again.splitlines()[-3:] == first.splitlines()[-3:] and "running" not in again
    (units / "mutation_prob=0.0__seed0.json").unlink()
    assert levers.main(argv + ["--report"]) == 0
    assert "no seed has both arms" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    ([], "name the lever with --set KEY=VALUE"),
    (["--set", "nosuch=1"], "unknown configuration key 'nosuch'"),
    (["--set", "remove_layers=maybe"], "remove_layers: cannot read 'maybe' as bool"),
    (["--set", "remove_layers"], "--set expects KEY=VALUE, got 'remove_layers'"),
    (["--set", "seed=3", "--set", "threads=2"], "--set seed, threads: not a lever"),
    (["--set", "tasks=mnist_5k"], "--set tasks: not a lever"),
    (["--set", "mutation_prob=0", "--set", "mutation-prob=0.5"], "--set mutation_prob is given twice"),
    (["--set", "max_seeds=3"], "the mode's configuration has these values already"),
    (["--set", "max_seeds=0", "--seeds", "0,x"], "--seeds takes comma-separated integers, got '0,x'"),
    (["--set", "max_seeds=0", "--mode", "nosuch"], "unknown mode 'nosuch'"),
])
def test_a_user_s_mistake_exits_2_with_one_line_naming_it(levers, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        levers.main([*argv, "--report", "--results", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_problem_a_run_finds_is_one_line_and_exit_2_and_the_finished_units_stay(levers, tmp_path, monkeypatch,
                                                                                  capsys):
    from conftest import tiny_config
    from quality_modes import Mode

    mode = Mode("tiny", tiny_config(tmp_path / "unused"), (1.0,), (), (), "tiny")
    monkeypatch.setattr(levers, "load_mode", lambda name: mode)
    monkeypatch.setattr(levers, "mode_names", lambda: ["tiny"])
    argv = ["--set", "root=file:/nonexistent/root.pt", "--seeds", "0", "--mode", "tiny", "--results", str(tmp_path)]
    assert levers.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: root=file:-nonexistent-root.pt__seed0: ") and "Traceback" not in err
    units = tmp_path / "tiny" / "units"
    assert sorted(p.name for p in units.iterdir() if not p.name.startswith(".")) == ["default__seed0.json"]


def test_a_unit_another_worker_runs_is_named_and_left_to_it(levers, tmp_path, monkeypatch, capsys):
    import os

    from conftest import tiny_config
    from quality_modes import Mode

    mode = Mode("tiny", tiny_config(tmp_path / "unused"), (1.0,), (), (), "tiny")
    monkeypatch.setattr(levers, "load_mode", lambda name: mode)
    monkeypatch.setattr(levers, "mode_names", lambda: ["tiny"])
    units = tmp_path / "tiny" / "units"
    units.mkdir(parents=True)
    (units / "default__seed0.claim").write_text(str(os.getppid()))  # a live process that is not this one
    assert levers.main(["--set", "mutation_prob=0", "--seeds", "0", "--mode", "tiny", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[default__seed0] another worker runs it" in out and "[default__seed0] running" not in out
    assert "[mutation_prob=0.0__seed0] running" in out
    assert sorted(p.name for p in units.glob("*.json")) == ["mutation_prob=0.0__seed0.json"]

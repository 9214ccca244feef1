"""The quality benchmark's resumable units: settings matching and claims shared between worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import benchmark_module

from munet.config import RunConfig


@pytest.fixture(scope="module")
def quality():
    return benchmark_module("quality.py")


@pytest.fixture(scope="module")
def quality_units(quality):
    """``benchmarks/quality_units.py``, importable once ``quality`` has put the benchmarks folder on the path."""
    import quality_units

    return quality_units


@pytest.fixture(scope="module")
def report(quality):
    """``benchmarks/quality_report.py``, importable once ``quality`` has put the benchmarks folder on the path."""
    import quality_report

    return quality_report


def test_a_unit_recorded_before_a_key_existed_matches_only_the_behaviour_of_that_time(quality_units, tmp_path):
    units = quality_units.Units(tmp_path)
    before = RunConfig(keep_diverged=False)  # how munet behaved before keep_diverged existed
    older = {"baseline": "finetune", "task": "a",
             "config": {k: v for k, v in before.to_dict().items() if k != "keep_diverged"}}
    units.put("finetune__a", {"settings": older, "test_acc": 0.5})
    current = {"baseline": "finetune", "task": "a", "config": before.to_dict()}
    assert units.get("finetune__a", current)["test_acc"] == 0.5
    assert units.get("finetune__a", dict(current, config=RunConfig(keep_diverged=True).to_dict())) is None
    assert units.get("finetune__a", dict(current, task="b")) is None
    operational = dict(current, config=before.replace(shared_training=False, out="elsewhere", threads=2).to_dict())
    assert units.get("finetune__a", operational)["test_acc"] == 0.5  # where and how it ran do not change results


def test_a_missing_key_means_the_behaviour_before_it_existed_not_todays_default(quality_units, tmp_path):
    units = quality_units.Units(tmp_path)
    older = {k: v for k, v in RunConfig(mutation_prob=0.1).to_dict().items() if k != "clone_prob"}
    units.put("munet_s1.0", {"settings": older, "test_acc": 0.5})
    clones_drew_with_mu = RunConfig(mutation_prob=0.1, clone_prob=0.1).to_dict()
    assert units.get("munet_s1.0", clones_drew_with_mu)["test_acc"] == 0.5
    assert units.get("munet_s1.0", RunConfig(mutation_prob=0.1, clone_prob=0.5).to_dict()) is None


def test_a_baseline_unit_depends_only_on_the_keys_its_training_reads(quality, quality_units, tmp_path):
    units = quality_units.Units(tmp_path)
    stored = {"baseline": "freeze:0", "task": "a", "config": RunConfig().to_dict(), "validations": 25}
    units.put("freeze-0__a", {"settings": stored, "test_acc": 0.5})

    def current(cfg: RunConfig, validations: int = 25) -> dict:
        config = {k: v for k, v in cfg.to_dict().items() if k in quality_units.BASELINE_KEYS}
        return {"baseline": "freeze:0", "task": "a", "config": config, "validations": validations}

    assert units.get("freeze-0__a", current(RunConfig(clone_prob=0.5, children_per_task=6)))["test_acc"] == 0.5
    assert units.get("freeze-0__a", current(RunConfig(), validations=26)) is None  # other images: retrain
    assert units.get("freeze-0__a", current(RunConfig(lr=0.05))) is None


def test_a_unit_claimed_by_a_live_process_is_skipped(quality_units, tmp_path):
    units = quality_units.Units(tmp_path)
    assert units.claim("munet_s1.0") and units.claim("munet_s1.0")  # this process may claim again
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        units.file("busy").with_suffix(".claim").write_text(str(other.pid))
        assert not units.claim("busy")
    finally:
        other.kill()
        other.wait()
    assert units.claim("busy")  # the claimant died: the unit is free again
    units.put("busy", {"settings": {}})
    assert not units.file("busy").with_suffix(".claim").exists()


def test_of_two_workers_that_find_a_unit_free_at_once_only_one_claims_it(quality_units, tmp_path):
    """A worker's look and claim hold the folder's lock: a claim made while another worker holds it waits, then finds
    that worker's claim (without the lock both claimed, or the shared temporary name crashed one)."""
    units = quality_units.Units(tmp_path)
    claim, ready = units.file("u").with_suffix(".claim"), tmp_path / "ready"
    other = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, pathlib, time
with open({str(tmp_path / ".claims.lock")!r}, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    pathlib.Path({str(ready)!r}).touch()
    time.sleep(0.5)  # it found the unit free; the other worker looks now
    pathlib.Path({str(claim)!r}).write_text(str(os.getpid()))
time.sleep(30)
"""])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists()
        assert not units.claim("u")
        assert claim.read_text() == str(other.pid)
    finally:
        other.kill()
        other.wait()


def test_a_unit_another_worker_finished_between_the_look_and_the_claim_counts_as_finished(quality_units, tmp_path):
    """finished_or_claim: free and not finished, this process claims it; finished, the result comes back with no
    claim; stored by another worker while this one claimed it, the result comes back and the claim is dropped."""
    units = quality_units.Units(tmp_path)
    settings = {"seed": 0}
    assert units.finished_or_claim("free", settings) == (None, True)
    units.put("free", {"settings": settings, "test_acc": 0.5})
    assert units.finished_or_claim("free", settings) == ({"settings": settings, "test_acc": 0.5}, False)

    class Racing(quality_units.Units):
        def claim(self, unit: str) -> bool:
            claimed = super().claim(unit)
            quality_units.Units(tmp_path).put(unit, {"settings": settings, "test_acc": 0.75})  # the other worker
            claim_file.write_text(str(os.getpid()))  # put dropped it: this process still holds its claim
            return claimed

    claim_file = units.file("raced").with_suffix(".claim")
    result, claimed = Racing(tmp_path).finished_or_claim("raced", settings)
    assert (result["test_acc"], claimed) == (0.75, False)
    assert not claim_file.exists()


def test_targets_are_checked_on_the_results(report):
    def method(name, family, average, params, budget=1, scale=None):
        return {"method": name, "family": family, "average": average, "params_per_task": params, "budget": budget,
                "scale_factor": scale, "spec": name.split(" ")[0]}

    methods = [method("muNet s=1.0", "munet", 0.90, 4.0, scale=1.0),
               method("muNet s=0.3", "munet", 0.85, 2.0, scale=0.3),
               method("muNet random root", "munet-random", 0.50, 4.0, scale=1.0),
               method("finetune", "finetune", 0.87, 10.0), method("freeze:4", "freeze", 0.88, 3.0),
               method("lora:4", "lora", 0.95, 12.0),
               method("muNet s=1.0 x2", "munet", 0.93, 4.0, budget=2, scale=1.0),
               method("freeze:0 x2", "freeze", 0.92, 9.0, budget=2)]
    targets = report.check_targets(methods, default_target=0.9)
    assert targets["vs_finetune"]["met"] and round(targets["vs_finetune"]["gain"], 6) == 0.03
    # freeze:4 beats s=0.3 on accuracy but has more parameters; it beats s=1 on parameters but not accuracy
    assert targets["curve_dominates"]["met"]
    assert "(muNet s=1.0, muNet s=0.3)" in report.format_targets(targets)  # the points it checked, not a blanket met
    assert targets["default_run"]["met"]
    # budget 1: lora:4 (0.95) is the best baseline and beats s=1; budget 2: s=1 wins with 4/9 of the parameters
    assert [(c["budget"], c["best"], c["met"]) for c in targets["curve"]["budgets"]] == \
        [(1, "lora:4", False), (2, "freeze:0 x2", True)]
    assert not targets["curve"]["met"]
    assert "provisional" not in report.format_targets(targets)  # nothing expected: nothing pending
    # budget 2's compute also buys budget 1's lora:4 (0.95), more accurate than freeze:0 x2: said beside the verdict
    assert [c["best_within"] for c in targets["curve"]["budgets"]] == ["lora:4", "lora:4"]
    assert report.format_targets(targets).count("within this compute (any budget <= x2) the best baseline is lora:4 "
                                                "0.9500") == 1
    # budget 2 expects adapters:64 too: its verdict is on part of the baselines and says so
    partial = report.check_targets(methods, expected={1: ["finetune"], 2: ["freeze:0", "adapters:64"]})
    assert [c["pending"] for c in partial["curve"]["budgets"]] == [[], ["adapters:64"]]
    assert report.format_targets(partial).count("provisional, not finished: adapters:64") == 1
    assert targets["curve"]["budgets"][0]["gap_error"] is None  # one seed each: no spread to judge the gap by
    methods[0].update(seeds=3, spread=0.003)
    methods[5].update(seeds=3, spread=0.004)
    budget1 = report.check_targets(methods)["curve"]["budgets"][0]
    assert round(budget1["gap"], 6) == -0.05 and abs(budget1["gap_error"] - (0.000025 / 3) ** 0.5) < 1e-12
    assert "gap -5.00 points, standard error 0.29" in report.format_targets(report.check_targets(methods))
    methods[4] = method("freeze:4", "freeze", 0.91, 3.0)  # now better and smaller than s=1
    targets = report.check_targets(methods, default_target=0.95)
    assert targets["curve_dominates"]["dominated_points"] == [{"baseline": "freeze:4", "munet": "muNet s=1.0"}]
    assert not targets["default_run"]["met"]
    assert targets["pretrained_vs_random"]["met"] and "NOT met" in report.format_targets(targets)
    only_baselines = report.check_targets([m for m in methods if m["family"] != "munet"])
    assert "curve_dominates" not in only_baselines  # no muNet point yet: not checked, not "NOT met"
    assert "muNet point" not in report.format_targets(only_baselines)


def test_the_table_shows_the_share_of_images_that_trained_the_kept_paths(report):
    def unit(lineage: list[int | None]) -> dict:
        tasks = {t: {"test_acc": 0.9, "accounted": 10, "lineage_images": n} for t, n in zip("ab", lineage)}
        return {"tasks": tasks, "images": 400, "wall_s": 1.0, "cores": 1, "device": "cpu", "root": "r",
                "settings": {"scale_factor": 1.0}}

    assert report.lineage_share(unit([100, 200])) == 0.75
    assert report.lineage_share(unit([100, None])) is None  # recorded before lineage counts
    method = report.munet_method("muNet s=1.0", "munet", [unit([100, 200]), unit([50, 50])], ["a", "b"])
    assert method["on_path"] == 0.5  # mean of the seeds' 75% and 25%
    row = report.format_table([method], ["a", "b"]).splitlines()[2]
    assert "50%" in row


def test_the_table_shows_how_much_validation_overstates_the_kept_models(quality, report):
    def unit(val: list[float | None]) -> dict:
        tasks = {t: {"test_acc": 0.9, "val_acc": v, "accounted": 10} for t, v in zip("ab", val)}
        return {"tasks": tasks, "images": 400, "wall_s": 1.0, "cores": 1, "device": "cpu", "root": "r",
                "settings": {"scale_factor": 1.0}}

    method = report.munet_method("muNet s=1.0", "munet", [unit([0.92, 0.9]), unit([0.95, 0.89])], ["a", "b"])
    assert method["optimism"] == pytest.approx(0.015)  # (0.02 + 0 + 0.05 - 0.01) / 4
    assert "+1.50" in report.format_table([method], ["a", "b"]).splitlines()[2]
    assert report.munet_method("m", "munet", [unit([0.92, None])], ["a", "b"])["optimism"] is None
    seeds = [{t: {"test_acc": 0.8, "val_acc": 0.79, "images": 64, "wall_s": 1.0, "cores": 1, "device": "cpu",
                  "params": {"own": 10, "shared": 20}} for t in "ab"}]
    baseline = report.baseline_method(quality.BaselineSpec.parse("freeze:1"), seeds, ["a", "b"])
    assert baseline["optimism"] == pytest.approx(-0.01)


def test_baselines_train_on_the_images_munet_processed(quality):
    from quality_modes import baseline_validations

    from munet.config import RunConfig

    cfg = RunConfig(batch_size=64, steps_between_validations=20)
    assert baseline_validations(cfg, 35_840, 6000) == 28  # K = 20: 35,840 / (20 x 64)
    assert baseline_validations(cfg, 10_000, 120) == 78  # K = ceil(120 / 64) = 2: 10,000 / 128
    assert baseline_validations(cfg, 10, 6000) == 1


def test_every_mode_loads_and_its_ablations_are_valid_configurations(quality):
    from quality_modes import load_mode, names

    assert {"full", "quick", "smoke"} <= set(names())
    for name in names():
        mode = load_mode(name)
        for budget in mode.budgets:
            mode.at_budget(mode.cfg, budget).validate()
        for _, changes in mode.ablations:
            assert mode.cfg.replace(**changes) != mode.cfg, "an ablation must change the configuration"


def test_a_larger_budget_trains_the_same_children_longer(quality):
    from quality_modes import load_mode

    mode = load_mode("quick")
    double = mode.at_budget(mode.cfg, 2)
    assert double.children_per_task == mode.cfg.children_per_task  # as many draws (measured: more waste, not depth)
    assert double.validations == 2 * mode.cfg.validations and mode.at_budget(mode.cfg, 1) == mode.cfg


def test_read_only_units_claim_nothing(quality_units, tmp_path):
    units = quality_units.Units(tmp_path / "units", read_only=True)
    assert units.get("u", {"x": 1}) is None and not (tmp_path / "units").exists()  # a report creates no folder
    assert not units.claim("u") and not units.file("u").with_suffix(".claim").exists()
    units = quality_units.Units(tmp_path, read_only=True)
    quality_units.Units(tmp_path).put("u", {"settings": {"x": 1}})
    assert units.get("u", {"x": 1}) == {"settings": {"x": 1}}  # finished units are still read


def test_a_unit_stays_valid_in_another_checkout(quality_units, tmp_path):
    from munet.config import RunConfig

    units = quality_units.Units(tmp_path)
    here, there = RunConfig(out="/a/run"), RunConfig(out="/b/run", device="cuda")
    units.put("u", {"settings": here.to_dict()})  # recorded with every key, as earlier versions did
    assert units.get("u", quality_units.result_settings(there)) is not None
    assert units.get("u", quality_units.result_settings(there.replace(seed=1))) is None


def test_an_interrupted_munet_unit_resumes_to_the_uninterrupted_result(quality, quality_units, tmp_path):
    from conftest import Crash, crashing_store, tiny_config

    sizes = {"a": 96, "b": 96}
    whole = quality_units.run_munet("u", tiny_config(tmp_path / "whole" / "u"), tmp_path / "whole",
                              quality_units.Units(tmp_path / "whole" / "units"), sizes)
    cfg = tiny_config(tmp_path / "cut" / "u")
    units = quality_units.Units(tmp_path / "cut" / "units")
    with pytest.raises(Crash):
        quality_units.run_munet("u", cfg, tmp_path / "cut", units, sizes, store_class=crashing_store("commit", 4))
    assert quality_units.interrupted_run(tmp_path / "cut" / "u", cfg)
    assert units.get("u", quality_units.result_settings(cfg)) is None
    resumed = quality_units.run_munet("u", cfg, tmp_path / "cut", units, sizes)
    assert "resuming" in (tmp_path / "cut" / "logs" / "u.log").read_text()
    assert resumed["tasks"] == whole["tasks"] and resumed["wall_s"] > 0


def test_a_run_of_other_settings_in_a_units_folder_is_started_again(quality, quality_units, tmp_path):
    from conftest import make_run, tiny_config

    make_run(tmp_path / "u", seed=1)
    cfg = tiny_config(tmp_path / "u")
    assert not quality_units.interrupted_run(tmp_path / "u", cfg)
    result = quality_units.run_munet("u", cfg, tmp_path, quality_units.Units(tmp_path / "units"), {"a": 96, "b": 96})
    assert result["settings"]["seed"] == 0
    assert "resuming" not in (tmp_path / "logs" / "u.log").read_text()


def test_a_baselines_worker_trains_what_is_ready_then_starts_free_munet_units_then_waits_for_busy_ones(quality):
    finished, free, busy_for = {"x1"}, {"x4"}, {"x2": 2}  # x2's muNet unit is run elsewhere: done after 2 looks
    order, naps = [], []

    def attempt(run: str, start: bool) -> bool:
        if run in finished:
            order.append(run)
            return True
        if not start:
            return False
        if run in free:  # nobody runs it: this worker trains the muNet unit, then the baseline
            finished.add(run)
            return attempt(run, start)
        busy_for[run] -= 1
        if busy_for[run] == 0:
            finished.add(run)
        return False

    left = quality.drain(["x2", "x4", "x1"], attempt, wait=True, say=lambda _: None, sleep=naps.append)
    assert left == [] and order == ["x1", "x4", "x2"] and len(naps) == 2  # it finished during the second look
    busy_for["y"] = 5
    assert quality.drain(["y"], attempt, wait=False, sleep=naps.append) == ["y"] and len(naps) == 2  # no waiting


def test_the_table_says_which_baseline_runs_stopped_early_and_why(quality, report):
    def unit(failed: str | None) -> dict:
        return {"test_acc": 0.9, "failed": failed, "images": 64, "wall_s": 1.0, "cores": 1, "device": "cpu",
                "params": {"own": 10, "shared": 20}}

    seeds = [{"a": unit(None), "b": unit(None)},
             {"a": unit(None), "b": dict(unit("diverged: loss 23 at step 25"), unit="adapters:64__b__b2__seed1")}]
    method = report.baseline_method(quality.BaselineSpec.parse("adapters:64"), seeds, ["a", "b"], budget=2)
    table = report.format_table([method], ["a", "b"])
    assert table.splitlines()[-1] == "  adapters:64__b__b2__seed1: diverged: loss 23 at step 25"
    seeds[1]["b"] = unit(None)
    assert "stopped early" not in report.format_table([report.baseline_method(
        quality.BaselineSpec.parse("adapters:64"), seeds, ["a", "b"])], ["a", "b"])


def test_collecting_an_unfinished_baseline_unit_neither_trains_nor_claims_it(quality, quality_units, tmp_path):
    """The report collects every finished seed of a baseline (``train`` off), also of one no longer among the best;
    one not finished is left to the workers."""
    from conftest import make_task

    runner = quality_units.BaselineRunner(RunConfig(), {"a": make_task("a")})
    spec = quality.BaselineSpec.parse("freeze:0")
    assert runner.run(spec, "a", quality_units.Units(tmp_path), 640, seed=1, tag="__seed1", train=False) is None
    assert not list(tmp_path.iterdir()) and runner.system is None  # nothing claimed, no root loaded


def test_the_seeds_go_to_the_best_baseline_by_its_mean_until_the_best_has_them(quality):
    """freeze:1 leads at seed 0, but its seeds bring its mean under freeze:2's one seed: freeze:2's seeds run too,
    so the verdict compares means over as many seeds (adapters:64, never on top, gets none)."""
    accuracy = {("freeze:1", 0): 0.974, ("freeze:1", 1): 0.969, ("freeze:1", 2): 0.971, ("freeze:2", 0): 0.972,
                ("freeze:2", 1): 0.970, ("freeze:2", 2): 0.969, ("adapters:64", 0): 0.960}
    finished = {key for key in accuracy if key[1] == 0}
    trained = []
    bench = object.__new__(quality.Benchmark)  # the schedule alone: no units, no training
    bench.baseline_runs = {}

    def baseline(spec, budget, seed, start=True, train=True):
        if train and (spec.name, seed) not in finished:
            trained.append((spec.name, seed))
            finished.add((spec.name, seed))
        if (spec.name, seed) in finished:
            bench.baseline_runs[(spec.name, budget, seed)] = {"a": {"test_acc": accuracy[(spec.name, seed)]}}
        return True

    bench.baseline = baseline
    bench.work_off = lambda pending: [baseline(*p) for p in pending]
    specs = [quality.BaselineSpec.parse(n) for n in ("freeze:1", "freeze:2", "adapters:64")]
    bench.repeat_best(2, 1, (0, 1, 2), specs)
    assert trained == [("freeze:1", 1), ("freeze:1", 2), ("freeze:2", 1), ("freeze:2", 2)]
    assert bench.best(2, 1) == ["freeze:1"]  # 0.9713 against 0.9703, each over 3 seeds


def test_the_curve_repeats_munet_over_the_budget_seeds_largest_budget_first(quality, capsys):
    assert quality.main(["--mode", "smoke", "--curve", "--plan"]) == 0
    plan = capsys.readouterr().out
    assert "munet_s1.0_b2_seed1: muNet s=1.0 x2, root dinov2-imgfocus, s = 1.0, budget x2, seed 1" in plan
    assert quality.main(["--curve", "--plan"]) == 0  # full mode: budgets 4 then 2, seeds 1 and 2 of each
    units = [line.split(":")[0].strip() for line in capsys.readouterr().out.splitlines() if "_seed" in line
             and "_b" in line.split(":")[0]]
    assert units == ["munet_s1.0_b4_seed1", "munet_s1.0_b4_seed2", "munet_s1.0_b2_seed1", "munet_s1.0_b2_seed2"]


@pytest.mark.parametrize("argv, message", [
    (["--smoke", "--report", "--tasks", "npz:/nonexistent/a.npz"], "error: npz file /nonexistent/a.npz does not exist"),
    (["--mode", "nope"], "unknown mode 'nope'"),
    (["--smoke", "--plan", "--adapters", "8,x"], "expected comma-separated integers"),
])
def test_a_user_s_mistake_exits_2_with_one_line_naming_it(quality, tmp_path, capsys, argv, message):
    try:
        code = quality.main([*argv, "--results", str(tmp_path)])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_plots_keep_the_pretrained_methods_readable(report, tmp_path, monkeypatch):
    """The random-init root, tens of points below, becomes an arrow rather than squeezing the axis; no baseline of the
    curve is drawn in muNet's colour."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    def point(family, average, params, **extra):
        return {"family": family, "average": average, "params_per_task": params, "budget": 1, "scale_factor": 1.0,
                "value": None, **extra}

    methods = [point("munet", 0.967, 8e6), point("munet-random", 0.76, 9e6), point("freeze", 0.972, 9e6, value=1)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at its axes
    report.plot(methods, "t", tmp_path / "q.png")
    ax = figures[-1].axes[0]
    low, high = ax.get_ylim()
    assert 0.95 < low < 0.967 and high > 0.972
    assert any("0.760 (below the axis)" in text.get_text() for text in ax.texts)
    assert (tmp_path / "q.png").stat().st_size > 0

    curve = [{**point("munet", 0.967, 8e6), "images": 1e5, "core_hours": 0.5, "budget": b} for b in (1, 2)]
    curve += [{**point("freeze", 0.97, 9e6, value=2), "spec": f"freeze:{x}", "images": 1e5, "core_hours": 0.5,
               "budget": b} for x in range(4) for b in (1, 2)]
    report.plot_curve(curve, "t", tmp_path / "c.png")
    baselines = {to_hex(line.get_color()) for line in figures[-1].axes[0].get_lines() if line.get_marker() == "s"}
    assert len(baselines) == 4 and to_hex("C3") not in baselines  # muNet's red

"""Paired lever comparisons: muNet's default against the default with a lever, both on child random streams.

On one random stream for the whole run, a lever changes every draw after its first action, so two runs on one seed
compare two lotteries from there on, 2 to 4 points apart per task. With ``random_streams = child`` the evolution's
stream is reseeded for every child from (seed, task iteration, generation, slot), and for every generation's data
draws: the two arms of a seed make the same draws wherever the lever does not act (tasks before its first action are
bit-identical), so the per-seed differences measure the lever with less noise than two unpaired means.
benchmarks/quality_levers.md, "Paired comparisons", explains the method and holds the results.

What runs: for each seed, the mode's muNet configuration (``--mode``, default full: the offline default) with
``random_streams = child``, once as it is (arm ``default``, shared by every lever) and once with the ``--set`` pairs.
What it prints: each seed's per-task test accuracy in both arms, the averages, the paired difference with its
standard error over the seeds, parameters per task and training images.

Command (two workers share the units, each skipping those the other runs; about 20 minutes a run in full mode on one
core)::

    python benchmarks/levers.py --set remove_layers=false --set max_seeds=0 --seeds 0,1,2 --threads 1
    python benchmarks/levers.py --set remove_layers=false --set max_seeds=0 --seeds 0,1,2 --report

Resumable: each finished run is a unit JSON under ``benchmarks/results/levers/<mode>/units/`` (kept; a unit counts
only while its settings match the current ones); run directories and logs go under ``.../work/`` (ignored), and an
interrupted run resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path as FsPath
from typing import Any

sys.path.insert(0, str(FsPath(__file__).resolve().parent))  # quality_modes, quality_units, also when imported by path

from quality_modes import load_mode  # noqa: E402
from quality_modes import names as mode_names  # noqa: E402
from quality_units import Units, result_settings, run_munet  # noqa: E402

from munet.config import RunConfig  # noqa: E402
from munet.errors import MunetError  # noqa: E402
from munet.runner import OPERATIONAL_KEYS  # noqa: E402
from munet.wiring import load_tasks  # noqa: E402

RESULTS = FsPath(__file__).resolve().parent / "results" / "levers"
DEFAULT_ARM = "default"
#: Keys a lever may not set: each arm's own, the mode's tasks (both arms must answer the same tasks), and those that
#: do not change a run's results.
NOT_LEVERS = {"seed", "random_streams", "tasks", *OPERATIONAL_KEYS}


def parse_lever(pairs: list[str], base: RunConfig) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (keys with ``-`` read as ``_``, as ``munet run --set`` does) as the values ``base`` takes
    with them, checked as a run checks them.

    Raises:
        ValueError: a pair without ``=``, a key given twice, a key that is no lever, or pairs that change nothing.
        ConfigError: an unknown key or a value out of range.
    """
    text: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key in text:
            raise ValueError(f"--set {key} is given twice")
        text[key] = value.strip()
    fixed = sorted(set(text) & NOT_LEVERS)
    if fixed:
        raise ValueError(f"--set {', '.join(fixed)}: not a lever (the comparison sets the seeds, the random streams "
                         "and the mode's tasks; where and how a run executes does not change its results)")
    cfg = base.replace(**text).validate()
    lever = {k: getattr(cfg, k) for k in text}
    if text and all(v == getattr(base, k) for k, v in lever.items()):
        raise ValueError(f"--set {', '.join(text)}: the mode's configuration has these values already, so the lever "
                         "would run the default twice")
    return lever


def arm_name(lever: dict[str, Any]) -> str:
    """The arm's unit name: ``default``, or the lever's pairs sorted by key and joined with ``+`` (``/`` read as
    ``-``: the name is a file name)."""
    def text(value: Any) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    return "+".join(f"{k}={text(v)}" for k, v in sorted(lever.items())).replace("/", "-") or DEFAULT_ARM


def arm_config(base: RunConfig, lever: dict[str, Any], seed: int, threads: int, work: FsPath) -> RunConfig:
    """The run of one arm and seed: ``base`` on child streams, with the lever's keys, writing under ``work``."""
    out = work / "runs" / f"{arm_name(lever)}__seed{seed}"
    return base.replace(seed=seed, threads=threads, random_streams="child", out=str(out), **lever).validate()


def paired(default: list[float], lever: list[float]) -> tuple[float, float | None]:
    """Mean of the per-seed differences ``lever - default`` and its standard error (``None`` with one seed)."""
    diffs = [b - a for a, b in zip(default, lever)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def average(result: dict[str, Any]) -> float:
    """A unit's average test accuracy over its tasks."""
    return statistics.fmean(t["test_acc"] for t in result["tasks"].values())


def per_task_params(result: dict[str, Any]) -> float:
    """A unit's accounted parameters per task."""
    return statistics.fmean(t["accounted"] for t in result["tasks"].values())


def format_report(lever: dict[str, Any], results: dict[int, dict[str, dict[str, Any]]]) -> str:
    """The paired table of the seeds whose two arms are both finished (``results[seed][arm]``)."""
    name = arm_name(lever)
    seeds = sorted(s for s, arms in results.items() if DEFAULT_ARM in arms and name in arms)
    if not seeds:
        return f"no seed has both arms ({DEFAULT_ARM}, {name}) finished yet"
    tasks = list(results[seeds[0]][DEFAULT_ARM]["tasks"])
    width = max(len(name), len(DEFAULT_ARM)) + 2
    lines = [f"{'seed':>4}  {'arm':<{width}}" + " ".join(f"{t[:8]:>8}" for t in tasks)
             + f"  {'average':>8}  {'params/task':>12}  {'images':>9}"]
    for seed in seeds:
        for arm in (DEFAULT_ARM, name):
            r = results[seed][arm]
            lines.append(f"{seed:>4}  {arm:<{width}}" + " ".join(f"{r['tasks'][t]['test_acc']:>8.4f}" for t in tasks)
                         + f"  {average(r):>8.4f}  {per_task_params(r):>12,.0f}  {r['images']:>9,}")
    averages = {arm: [average(results[s][arm]) for s in seeds] for arm in (DEFAULT_ARM, name)}
    mean, se = paired(averages[DEFAULT_ARM], averages[name])
    diffs = " / ".join(f"{100 * (b - a):+.2f}" for a, b in zip(averages[DEFAULT_ARM], averages[name]))
    spread = f", standard error {100 * se:.2f}" if se is not None else " (one seed: no standard error)"
    means = {arm: f"{statistics.fmean(values):.4f}" for arm, values in averages.items()}
    lines.append(f"{len(seeds)} seed(s): {DEFAULT_ARM} {means[DEFAULT_ARM]}, {name} {means[name]}; paired difference "
                 f"{100 * mean:+.2f} points ({diffs}){spread}")
    task_diffs = (statistics.fmean(results[s][name]["tasks"][t]["test_acc"] - results[s][DEFAULT_ARM]["tasks"][t]
                                   ["test_acc"] for s in seeds) for t in tasks)
    lines.append("per task (points): " + ", ".join(f"{t} {100 * d:+.2f}" for t, d in zip(tasks, task_diffs)))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="the lever (repeatable)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--mode", default="full", help="a module of benchmarks/quality_modes (full, quick, smoke)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--report", action="store_true", help="print the table of the finished units; run nothing")
    parser.add_argument("--results", default=str(RESULTS), help="results directory (default: benchmarks/results/"
                        "levers)")
    args = parser.parse_args(argv)
    if args.mode not in mode_names():  # a user's mistake is one line and exit 2, as in munet's command line
        parser.error(f"unknown mode {args.mode!r}; known modes: {', '.join(mode_names())}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if not args.set:
        parser.error("name the lever with --set KEY=VALUE (it is compared with the default)")
    try:
        base = load_mode(args.mode).cfg
        lever = parse_lever(args.set, base)
        work = FsPath(args.results) / args.mode / "work"
        arms = {seed: {DEFAULT_ARM: arm_config(base, {}, seed, args.threads, work),
                       arm_name(lever): arm_config(base, lever, seed, args.threads, work)} for seed in seeds}
    except (ValueError, MunetError) as err:
        parser.error(str(err))
    units = Units(FsPath(args.results) / args.mode / "units", read_only=args.report)
    results: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in seeds}
    sizes: dict[str, int] | None = None
    for seed, configs in arms.items():
        for name, cfg in configs.items():
            unit = f"{name}__seed{seed}"
            done = units.get(unit, result_settings(cfg))
            if done is None and not args.report and units.busy(unit):
                print(f"[{unit}] another worker runs it", flush=True)
            elif done is None and not args.report:
                try:
                    if sizes is None:  # the names run_munet reads the images of; loaded once, when a run is due
                        sizes = {n: d.sizes()["train"] for n, d in load_tasks(base.tasks, 0, base.data_dir,
                                                                             sys.stderr).items()}
                    print(f"[{unit}] running (log: {work / 'logs' / unit}.log)", flush=True)
                    done = run_munet(unit, cfg, work, units, sizes)
                except MunetError as err:  # a root or data problem the run found: the finished units stay
                    units.release(unit)
                    print(f"error: {unit}: {err}", file=sys.stderr)
                    return 2
            if done is not None:
                results[seed][name] = done
    print(format_report(lever, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

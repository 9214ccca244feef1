"""The quality benchmark's results: one point per method (seed means and spread), the table, the targets as the
issue states them, and the two figures (accuracy against parameters per task, and against compute).

Pure functions of the unit results that ``benchmarks/quality_units.py`` stores, and ``DEFINITIONS``, what their
quantities mean; nothing here trains or reads files.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from pathlib import Path as FsPath
from typing import Any

from baselines import BaselineSpec

DEFINITIONS = {  # what the report's quantities mean, stored beside them in quality.json
    "budget": "budget 1 is muNet's configuration; budget b trains each of muNet's children b times the validation "
              "periods, and each baseline trains on the training images muNet s=1 processed for the task at budget b "
              "(all children and probes, measured from the run's store)",
    "params_per_task": "muNet: mean accounted params (spec §5); baselines: own params + shared frozen root params / "
                       "number of tasks",
    "core_hours": "wall seconds x torch CPU threads / 3600",
    "images": "training images processed (muNet: all children and probes; baselines: their budget)",
    "spread": "sample standard deviation of the average over seeds",
    "optimism": "val-test: mean over tasks and seeds of the kept model's validation minus test accuracy",
}


def core_hours(units: Iterable[dict[str, Any]]) -> float:
    """The core-hours the unit results took: wall seconds x cores."""
    return sum(u["wall_s"] * u["cores"] for u in units) / 3600


def task_average(values: list[float | None]) -> float | None:
    """Mean test accuracy; ``None`` unless every task has one (a failed task makes the average meaningless)."""
    return sum(values) / len(values) if values and all(v is not None for v in values) else None


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _seeds(method: dict[str, Any], averages: list[float | None]) -> dict[str, Any]:
    """Adds ``seeds`` and ``spread`` (sample standard deviation of the per-seed averages; 0 for one seed)."""
    known = [a for a in averages if a is not None]
    method.update(seeds=len(averages), per_seed=averages,
                  spread=statistics.stdev(known) if len(known) > 1 else 0.0)
    return method


def optimism(results: Iterable[dict[str, Any]]) -> float | None:
    """Mean validation minus test accuracy of the kept models (one result per task and seed): how much the
    validations that chose them overstate them. ``None`` if a result lacks either accuracy."""
    pairs = [(r.get("val_acc"), r.get("test_acc")) for r in results]
    if not pairs or any(val is None or test is None for val, test in pairs):
        return None
    return _mean([val - test for val, test in pairs])


def lineage_share(unit: dict[str, Any]) -> float | None:
    """Share of a muNet unit's training images that trained its tasks' best-path lineages (the rest went to
    rejected children, side branches and probes); ``None`` for units recorded without lineage counts."""
    tasks = unit["tasks"].values()
    if not unit["images"] or any(t.get("lineage_images") is None for t in tasks):
        return None
    return sum(t["lineage_images"] for t in tasks) / unit["images"]


def munet_method(label: str, family: str, units: list[dict[str, Any]], task_names: list[str], budget: int = 1
                 ) -> dict[str, Any]:
    """One muNet point: the mean over ``units`` (one per seed) of test accuracies, parameters and compute."""
    def task_mean(t: str, key: str) -> float | None:
        values = [u["tasks"].get(t, {}).get(key) for u in units]
        return _mean(values) if values and None not in values else None

    averages = [task_average([u["tasks"].get(t, {}).get("test_acc") for t in task_names]) for u in units]
    per_task = _mean([sum(t["accounted"] for t in u["tasks"].values()) / max(len(u["tasks"]), 1) for u in units])
    shares = [lineage_share(u) for u in units]
    first = units[0]
    method = {"method": label, "family": family, "budget": budget, "scale_factor": first["settings"]["scale_factor"],
              "root": first["root"], "test_acc": {t: task_mean(t, "test_acc") for t in task_names},
              "average": _mean(averages) if None not in averages else None, "params_per_task": per_task,
              "images": round(_mean([u["images"] for u in units])), "wall_s": _mean([u["wall_s"] for u in units]),
              "core_hours": _mean([core_hours([u]) for u in units]), "device": first["device"],
              "lineage_images": {t: first["tasks"][t].get("lineage_images") for t in first["tasks"]},
              "on_path": None if None in shares else _mean(shares), "tasks": first["tasks"],
              "optimism": optimism(u["tasks"].get(t, {}) for u in units for t in task_names)}
    return _seeds(method, averages)


def baseline_method(spec: BaselineSpec, runs: list[dict[str, dict[str, Any]]], task_names: list[str],
                    budget: int = 1) -> dict[str, Any]:
    """One baseline point: the mean over ``runs`` (one per seed, each ``task -> unit result``)."""
    count = len(task_names)
    first = runs[0]
    per_task = sum(r["params"]["own"] + r["params"]["shared"] / count for r in first.values()) / count
    averages = [task_average([run[t]["test_acc"] for t in task_names]) for run in runs]
    accs = {t: [run[t]["test_acc"] for run in runs] for t in task_names}
    method = {"method": spec.name + (f" x{budget}" if budget != 1 else ""), "family": spec.kind, "value": spec.value,
              "spec": spec.name, "budget": budget,
              "test_acc": {t: _mean(v) if None not in v else None for t, v in accs.items()},
              "average": _mean(averages) if None not in averages else None, "params_per_task": per_task,
              "images": round(_mean([sum(r["images"] for r in run.values()) for run in runs])),
              "wall_s": _mean([sum(r["wall_s"] for r in run.values()) for run in runs]),
              "core_hours": _mean([core_hours(run.values()) for run in runs]),
              "device": next(iter(first.values()))["device"], "on_path": 1.0, "tasks": first,
              "optimism": optimism(run[t] for run in runs for t in task_names),
              "stopped": [f"{run[t].get('unit', t)}: {run[t]['failed']}" for run in runs for t in task_names
                          if run[t].get("failed")]}
    return _seeds(method, averages)


def _short(task: str) -> str:
    """``fashion_mnist_coarse`` -> ``fas_mni_coa``: distinct column headers that fit the table."""
    return "_".join(part[:3] for part in task.split("_"))


def format_table(methods: list[dict[str, Any]], task_names: list[str]) -> str:
    """One row per method; ``on path``: the share of its training images that trained the paths it kept (a
    baseline's one path takes them all); ``val-test``: :func:`optimism`, in points."""
    cols = [_short(t) for t in task_names]
    header = f"{'method':<26}" + "".join(f" {c:>11}" for c in cols) + f" {'average':>8} {'spread':>7} " \
        f"{'params/task':>12} {'train imgs':>11} {'on path':>7} {'val-test':>8} {'wall s':>8} {'core-h':>7}"
    lines = [header, "-" * len(header)]
    for m in methods:
        accs = "".join(f" {a:>11.4f}" if a is not None else f" {'-':>11}" for a in m["test_acc"].values())
        avg = f"{m['average']:.4f}" if m["average"] is not None else "-"
        spread = f"{m['spread']:.4f}" if m.get("seeds", 1) > 1 else "1 seed"
        share = f"{m['on_path']:.0%}" if m.get("on_path") is not None else "-"
        gap = f"{100 * m['optimism']:+.2f}" if m.get("optimism") is not None else "-"
        lines.append(f"{m['method']:<26}{accs} {avg:>8} {spread:>7} {m['params_per_task']:>12,.0f} "
                     f"{m['images']:>11,} {share:>7} {gap:>8} {m['wall_s']:>8.0f} {m['core_hours']:>7.3f}")
    stopped = [f"  {note}" for m in methods for note in m.get("stopped", [])]
    if stopped:  # why such a run processed fewer images than its budget
        lines += ["", "stopped early (each keeps its best validated weights):", *stopped]
    return "\n".join(lines)


CLEAR_MARGIN = 0.05  # "beats the random root by a clear margin": our reading, 5 points of average accuracy


BASELINE_FAMILIES = ("finetune", "freeze", "adapters", "lora")


def gap_error(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    """Standard error of the difference of two methods' seed-mean averages (Welch: the seeds of each are independent
    runs); ``None`` unless both have at least two seeds, since one run says nothing of its own spread."""
    if a.get("seeds", 1) < 2 or b.get("seeds", 1) < 2:
        return None
    return math.sqrt(a["spread"] ** 2 / a["seeds"] + b["spread"] ** 2 / b["seeds"])


def check_targets(methods: list[dict[str, Any]], default_target: float | None = None,
                  expected: dict[int, list[str]] | None = None) -> dict[str, Any]:
    """The targets, checked on the results (budget 1 unless stated):

    * ``curve``: at every budget, muNet s = 1 is at least as accurate as the best baseline at that budget with at
      most half of its parameters per task (``best_within``: the best at any budget up to it, which the same compute
      also buys, for the reader; the verdict is the issue's, at the same budget); ``pending`` lists the baselines
      ``expected`` at that budget (budget -> baseline names) that have no result yet, so a verdict on part of them
      says it is provisional;
    * ``curve_dominates``: no baseline point has both higher accuracy and fewer parameters than a point of muNet's
      s-sweep (left out while there is no muNet point);
    * ``default_run``: muNet s = 1 reaches ``default_target`` average test accuracy (when given);
    * ``vs_finetune`` (the paper's headline: >= +2.4 points with <= 53 % of fine-tuning's parameters per task) and
      ``pretrained_vs_random`` (a clear margin), as before.
    """
    at = lambda m, b: m.get("budget", 1) == b and m["average"] is not None  # noqa: E731
    s1 = {m["budget"]: m for m in methods if m["family"] == "munet" and m["scale_factor"] == 1.0 and at(m, m["budget"])}
    by_name = {m["method"]: m for m in methods if at(m, 1)}
    out: dict[str, Any] = {}
    curve = []
    for budget, mu in sorted(s1.items()):
        baselines = [m for m in methods if m["family"] in BASELINE_FAMILIES and at(m, budget)]
        if not baselines:
            continue
        best = max(baselines, key=lambda m: m["average"])
        pending = [n for n in (expected or {}).get(budget, []) if n not in {m["spec"] for m in baselines}]
        share = mu["params_per_task"] / best["params_per_task"]
        # a user with this compute may also stop at a smaller budget: the best baseline any budget up to it reaches
        within = max((m for m in methods if m["family"] in BASELINE_FAMILIES and m["average"] is not None
                      and m.get("budget", 1) <= budget), key=lambda m: m["average"])
        curve.append({"budget": budget, "munet": mu["average"], "best": best["method"], "best_average": best["average"],
                      "param_share": share, "met": mu["average"] >= best["average"] and share <= 0.5,
                      "gap": mu["average"] - best["average"], "gap_error": gap_error(mu, best),
                      "pending": pending, "best_within": within["method"], "best_within_average": within["average"]})
    if curve:
        out["curve"] = {"budgets": curve, "met": all(c["met"] for c in curve)}
    sweep = [m for m in by_name.values() if m["family"] == "munet"]
    dominating = [{"baseline": b["method"], "munet": m["method"]} for b in by_name.values()
                  if b["family"] in BASELINE_FAMILIES for m in sweep
                  if b["average"] > m["average"] and b["params_per_task"] < m["params_per_task"]]
    if sweep:  # with no muNet point yet there is nothing to check
        out["curve_dominates"] = {"dominated_points": dominating, "checked": [m["method"] for m in sweep],
                                  "met": not dominating}
    if default_target is not None and 1 in s1:
        out["default_run"] = {"average": s1[1]["average"], "target": default_target,
                              "met": s1[1]["average"] >= default_target}
    ft, rnd = by_name.get("finetune"), by_name.get("muNet random root")
    if 1 in s1 and ft:
        gain, share = s1[1]["average"] - ft["average"], s1[1]["params_per_task"] / ft["params_per_task"]
        out["vs_finetune"] = {"gain": gain, "param_share": share, "met": gain >= 0.024 and share <= 0.53}
    if 1 in s1 and rnd:
        margin = s1[1]["average"] - rnd["average"]
        out["pretrained_vs_random"] = {"margin": margin, "met": margin >= CLEAR_MARGIN}
    return out


def format_targets(targets: dict[str, Any]) -> str:
    verdict = lambda t: "met" if t["met"] else "NOT met"  # noqa: E731
    lines = []
    for c in targets.get("curve", {}).get("budgets", []):
        lines.append(f"budget x{c['budget']}: muNet s=1 {c['munet']:.4f} vs best baseline {c['best']} "
                     f"{c['best_average']:.4f}, with {c['param_share']:.0%} of its parameters per task (target: at "
                     f"least as accurate with <= 50%): {verdict(c)}; gap {c['gap'] * 100:+.2f} points, "
                     + (f"standard error {c['gap_error'] * 100:.2f}" if c.get("gap_error") is not None
                        else "no standard error (a point of one seed)")
                     + (f"; provisional, not finished: {', '.join(c['pending'])}" if c.get("pending") else "")
                     + (f"; within this compute (any budget <= x{c['budget']}) the best baseline is "
                        f"{c['best_within']} {c['best_within_average']:.4f}" if c["best_within"] != c["best"] else ""))
    if "curve_dominates" in targets:
        d = targets["curve_dominates"]
        pairs = ", ".join(f"{p['baseline']} over {p['munet']}" for p in d["dominated_points"]) or "none"
        checked = ", ".join(d.get("checked", []))  # the s-sweep points finished so far
        lines.append(f"baseline points with higher accuracy and fewer parameters than a muNet point ({checked}): "
                     f"{pairs}: {verdict(d)}")
    if "default_run" in targets:
        t = targets["default_run"]
        lines.append(f"default run: {t['average']:.4f} average test accuracy (target >= {t['target']}): {verdict(t)}")
    if "vs_finetune" in targets:
        t = targets["vs_finetune"]
        lines.append(f"muNet s=1 vs fine-tune: {t['gain'] * 100:+.2f} points with {t['param_share']:.0%} of its "
                     f"parameters per task (target >= +2.4 with <= 53%): {verdict(t)}")
    if "pretrained_vs_random" in targets:
        t = targets["pretrained_vs_random"]
        lines.append(f"pretrained vs random root: {t['margin'] * 100:+.2f} points (clear margin: >= "
                     f"{CLEAR_MARGIN * 100:.0f}): {verdict(t)}")
    return "\n".join(lines)


def plot(methods: list[dict[str, Any]], title: str, target: FsPath) -> None:
    """Average test accuracy against parameters per task: muNet's curve against every baseline point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    styles = {"munet": ("C3", "o", "-"), "munet-random": ("C7", "*", ""), "finetune": ("C0", "s", ""),
              "freeze": ("C1", "v", "--"), "adapters": ("C2", "^", "--"), "lora": ("C4", "D", "--")}
    labels = {"munet": "muNet (scale factor s)", "munet-random": "muNet, random-init root", "finetune": "fine-tune all",
              "freeze": "freeze bottom X blocks", "adapters": "adapters (width X)", "lora": "LoRA (rank r)"}
    for family, (color, marker, line) in styles.items():
        points = sorted(((m["params_per_task"], m["average"], m) for m in methods
                         if m["family"] == family and m["average"] is not None and m.get("budget", 1) == 1),
                        key=lambda p: p[:2])
        if not points:
            continue
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.plot(xs, ys, color=color, marker=marker, linestyle=line or "none", label=labels[family])
        for x, y, m in points:
            note = f"s={m['scale_factor']}" if family == "munet" else "" if m.get("value") is None else str(m["value"])
            if note:
                ax.annotate(note, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    _clip_far_below(ax, [m for m in methods if m["average"] is not None and m.get("budget", 1) == 1],
                    styles["munet-random"][0], labels["munet-random"])
    _finish(fig, [ax], ["parameters per task (shared parts split between tasks)"], title, target)


def _clip_far_below(ax: Any, points: list[dict[str, Any]], color: str, label: str) -> None:
    """Keeps the y axis on the pretrained methods, whose differences are a few points, when the random-init root
    lies tens of points below them: that point becomes an arrow at the bottom edge that says its accuracy."""
    far = [m for m in points if m["family"] == "munet-random"]
    near = [m["average"] for m in points if m["family"] != "munet-random"]
    if not far or not near:
        return
    pad = max(0.1 * (max(near) - min(near)), 0.005)
    low, high = min(near) - pad, max(near) + pad
    below = [m for m in far if m["average"] < low]
    if not below:
        return
    ax.set_ylim(low, high)
    for m in below:
        ax.annotate(f"{label}: {m['average']:.3f} (below the axis)", xy=(m["params_per_task"], low),
                    xytext=(0, 24), textcoords="offset points", ha="right", fontsize=7, color=color,
                    arrowprops=dict(arrowstyle="->", color=color))


def _finish(fig: Any, axes: list[Any], xlabels: list[str], title: str, target: FsPath) -> None:
    """Log x axes, labels, grid and legend (on the first axis); saves the figure to ``target``."""
    import matplotlib.pyplot as plt

    for ax, xlabel in zip(axes, xlabels):
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("average test accuracy")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    if axes[0].get_legend_handles_labels()[0]:  # no legend for an empty plot (no finished unit yet)
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    plt.close(fig)


# muNet's line is red (C3); no baseline shares its colour
BASELINE_COLORS = [f"C{i}" for i in range(10) if i != 3]


def plot_curve(methods: list[dict[str, Any]], title: str, target: FsPath) -> None:
    """Average test accuracy against compute, one line per method over the budgets, in two panels: training
    images processed and core-hours; error bars are the spread over seeds where a point has several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for m in methods:
        if m["average"] is None:
            continue
        if m["family"] == "munet" and m["scale_factor"] == 1.0:
            lines.setdefault("muNet s=1", []).append(m)
        elif m["family"] in BASELINE_FAMILIES:
            lines.setdefault(m["spec"], []).append(m)
    # a baseline is a curve once it has several budgets or seeds (the strongest ones); the rest would crowd budget 1
    lines = {k: v for k, v in lines.items() if len(v) > 1 or k == "muNet s=1" or v[0].get("seeds", 1) > 1}
    # images processed are the equal-compute measure (exact); core-hours are measured, so they move with the load
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for i, (label, points) in enumerate(sorted(lines.items(), key=lambda kv: kv[0] != "muNet s=1")):
        points.sort(key=lambda m: m["budget"])
        ys, errs = [m["average"] for m in points], [m.get("spread", 0.0) for m in points]
        style = dict(color="C3", marker="o", linewidth=2.5) if label == "muNet s=1" else \
            dict(color=BASELINE_COLORS[(i - 1) % len(BASELINE_COLORS)], marker="s", linestyle="--")
        for ax, key in zip(axes, ("images", "core_hours")):
            xs = [m[key] for m in points]
            ax.errorbar(xs, ys, yerr=errs, capsize=3, label=label, **style)
            for x, y, m in zip(xs, ys, points):
                ax.annotate(f"x{m['budget']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    _finish(fig, list(axes), ["training images processed (equal compute)", "core-hours (measured; load-dependent)"],
            title, target)

"""The report's figures, drawn with matplotlib from the records :mod:`munet.reporting.report` gathers.

Each function returns a PNG as a ``data:`` URI, so the page that shows it needs no other file and no network. The
figures are drawn on :class:`matplotlib.figure.Figure` objects, not pyplot, so no global state or display backend
is involved (a report can be written from a thread or while a run trains in the same process).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.patheffects import withStroke

ROOT_COLOR = "#d9d9d9"
DPI = 110


def task_colors(tasks: Sequence[str]) -> dict[str, Any]:
    """One colour per task (tab10, then tab20's lighter shades, without their greys, which are the root's), the
    same in every figure of a report."""
    from matplotlib import colormaps

    grey = (colormaps["tab10"].colors[7], colormaps["tab20"].colors[15])  # too close to the root's grey
    palette = [c for c in list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2]) if c not in grey]
    return {task: palette[i % len(palette)] for i, task in enumerate(tasks)}


def to_data_uri(fig: Figure) -> str:
    """The figure as a base64 PNG ``data:`` URI."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def system_figure(tasks: list[str], slots: list[str], cells: dict[str, dict[str, tuple[int, str]]]) -> Figure:
    """Tasks against component slots (the paper's Fig. 1 kind): each cell is the component the task's best path
    uses there, coloured by the task that made it (grey: the root's), labelled with its id, hatched when an adapter.

    Args:
        tasks: row order.
        slots: column order (forward order of the slots any best path uses).
        cells: ``task -> slot -> (component id, origin)``; a missing slot is left blank.
    """
    colors = task_colors(tasks)
    fig = Figure(figsize=(max(6.0, 1.6 + 0.62 * len(slots)), 1.4 + 0.42 * len(tasks)))
    ax = fig.add_subplot()
    shared = _shared_ids(cells)
    for row, task in enumerate(tasks):
        for col, slot in enumerate(slots):
            if slot not in cells.get(task, {}):
                continue
            cid, origin = cells[task][slot]
            color = ROOT_COLOR if origin == "root" else colors.get(origin, "#999999")
            ax.add_patch(Rectangle((col, row), 1, 1, facecolor=color, edgecolor="white", linewidth=1.5,
                                   hatch="///" if slot.startswith("adapter") else None))
            # bold ids are used by more than one task: the visible sharing
            ax.text(col + 0.5, row + 0.5, str(cid), ha="center", va="center", fontsize=8,
                    fontweight="bold" if cid in shared else "normal",
                    color="black" if origin == "root" else "white",
                    path_effects=[] if origin == "root" else [withStroke(linewidth=2.5, foreground=color)])
    ax.set_xlim(0, len(slots))
    ax.set_ylim(len(tasks), 0)
    ax.set_xticks([i + 0.5 for i in range(len(slots))], slots, rotation=60, ha="right", fontsize=8)
    ax.set_yticks([i + 0.5 for i in range(len(tasks))], tasks, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    legend = [Patch(facecolor=ROOT_COLOR, label="root (pretrained)")]
    legend += [Patch(facecolor=colors[t], label=f"made by {t}") for t in tasks if _made_any(cells, t)]
    legend.append(Patch(facecolor="white", edgecolor="grey", hatch="///", label="adapter"))
    ax.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title("component of each task's best path (number: component id; bold: shared by several tasks)",
                 fontsize=9, loc="left")
    return fig


def _shared_ids(cells: dict[str, dict[str, tuple[int, str]]]) -> set[int]:
    users: dict[int, set[str]] = {}
    for task, row in cells.items():
        for cid, _ in row.values():
            users.setdefault(cid, set()).add(task)
    return {cid for cid, who in users.items() if len(who) > 1}


def _made_any(cells: dict[str, dict[str, tuple[int, str]]], task: str) -> bool:
    return any(origin == task for row in cells.values() for _, origin in row.values())


def progress_figure(tasks: list[str], curves: dict[str, dict[str, list[tuple[int, float]]]],
                    iterations: list[tuple[int, int, str]]) -> Figure:
    """The best validation accuracy and score of each task so far, against generations of the whole run.

    Args:
        tasks: the tasks, in colour order.
        curves: ``"accuracy"`` and ``"score"``, each ``task -> [(generation, best so far)]``.
        iterations: ``(first generation, end generation, task)`` of each task iteration, shaded and labelled.
    """
    colors = task_colors(tasks)
    panels = [("accuracy", "best validation accuracy"), ("score", "best score")]
    if curves["score"] == curves["accuracy"]:  # no parameter cost in the score (scale_factor 1): one panel says it
        panels = [("accuracy", "best validation accuracy\n(= best score)")]
    fig = Figure(figsize=(11, 0.8 + 2.7 * len(panels)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False).ravel()
    for ax, (key, label) in zip(axes, panels):
        for task in tasks:
            points = curves[key].get(task)
            if points:
                xs, ys = zip(*points)
                ax.step(xs, ys, where="post", color=colors[task], label=task, linewidth=1.6)
                ax.plot(xs[-1:], ys[-1:], "o", color=colors[task], markersize=3)
        for i, (start, end, _) in enumerate(iterations):
            if i % 2:
                ax.axvspan(start, end, color="#f2f2f2", linewidth=0)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    top = axes[0].secondary_xaxis("top")
    named = iterations[::math.ceil(len(iterations) / 24) or 1]  # at most 24 names stay readable
    top.set_xticks([(start + end) / 2 for start, end, _ in named], [task for _, _, task in named],
                   rotation=30, ha="left", fontsize=7)
    top.tick_params(length=0)
    axes[-1].set_xlabel("generation (shaded bands: task iterations, named on top)")
    axes[0].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return fig


def quality_params_figure(tasks: list[str], munet: dict[str, tuple[float, float]],
                          baselines: list[dict[str, Any]]) -> Figure:
    """Test accuracy against parameters per task: muNet's best path, and each baseline method's point.

    Args:
        tasks: the tasks (one panel each when there are baselines, else one panel for all).
        munet: ``task -> (accounted parameters, accuracy)`` of the task's best path.
        baselines: ``{"method", "params_per_task", "test_acc": {task: accuracy}}`` per method.
    """
    colors = task_colors(tasks)
    if not baselines:
        fig = Figure(figsize=(8, 4.5))
        ax = fig.add_subplot()
        for task, (params, acc) in munet.items():
            ax.plot(params / 1e6, acc, "o", color=colors[task], label=task, markersize=7)
        ax.set_xlabel("parameters accounted to the task (millions)")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        return fig
    shown = [t for t in tasks if t in munet]
    cols = min(4, max(len(shown), 1))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.1 * cols + 2.2, 2.7 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    markers = "sD^vP<>X*h"
    for ax, task in zip(axes, shown):
        for i, method in enumerate(baselines):
            acc = method["test_acc"].get(task)
            if acc is not None:
                ax.plot(method["params_per_task"] / 1e6, acc, markers[i % len(markers)], color="#777777",
                        markerfacecolor="none", markersize=7, label=method["method"])
        params, acc = munet[task]
        ax.plot(params / 1e6, acc, "o", color=colors[task], markersize=9, label="this run")
        ax.set_title(task, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, frameon=False)
    fig.supxlabel("parameters per task (millions; baselines: their average per task)", fontsize=9)
    fig.supylabel("test accuracy", fontsize=9)
    return fig


def hparam_figure(tasks: list[str], trajectories: dict[str, dict[str, list[tuple[int, Any]]]]) -> Figure:
    """Each evolved hyperparameter (mutation probabilities included) along each task's best-path lineage.

    Args:
        tasks: the tasks, in colour order.
        trajectories: ``hparam -> task -> [(generation, value)]`` along the lineage; non-numeric values are drawn
            on a categorical axis.
    """
    colors = task_colors(tasks)
    keys = list(trajectories)
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols + 1.8, 2.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        per_task = trajectories[key]
        values = {v for points in per_task.values() for _, v in points}
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        levels = sorted(values, key=str)
        for task, points in per_task.items():
            xs = [x for x, _ in points]
            ys = [v if numeric else levels.index(v) for _, v in points]
            ax.step(xs, ys, where="post", color=colors[task], marker="o", markersize=3, linewidth=1.2, label=task)
        if not numeric:
            ax.set_yticks(range(len(levels)), [str(v) for v in levels])
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    handles = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels())}
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=8, frameon=False)
    fig.supxlabel("generation of the lineage step", fontsize=9)
    return fig


def mutation_figure(mutations: list[dict[str, Any]]) -> Figure:
    """Per mutation kind: children tried and accepted, and the mean change of validation accuracy they brought."""
    ordered = sorted(mutations, key=lambda m: m["tried"])
    kinds = [m["kind"] for m in ordered]
    fig = Figure(figsize=(10, 1.2 + 0.26 * len(kinds)), layout="constrained")
    counts, effect = fig.subplots(1, 2, sharey=True, width_ratios=(3, 2))
    ys = range(len(kinds))
    counts.barh(ys, [m["tried"] for m in ordered], color="#c6dbef", label="tried")
    counts.barh(ys, [m["accepted"] for m in ordered], color="#2171b5", label="accepted")
    counts.set_yticks(ys, kinds, fontsize=8)
    counts.set_xlabel("children of the same task carrying the mutation")
    counts.legend(fontsize=8, frameon=False, loc="lower right")
    deltas = [m["mean_val_delta"] for m in ordered]
    effect.barh(ys, deltas, color=["#41ab5d" if d >= 0 else "#cb181d" for d in deltas])
    effect.axvline(0, color="black", linewidth=0.8)
    effect.set_xlabel("mean validation change vs parent")
    for ax in (counts, effect):
        ax.grid(axis="x", alpha=0.3)
    return fig

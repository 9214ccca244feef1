"""The end-of-run report: per-task accuracy, parameters and where each task's components come from."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from munet.evolution.system import System
from munet.model.path import TaskPath


def _compress(names: list[str]) -> str:
    """``block_0, block_1, block_2`` -> ``block_0-2`` (keeps other names as they are)."""
    out: list[str] = []
    runs: dict[str, list[int]] = defaultdict(list)
    for name in names:
        prefix, _, idx = name.rpartition("_")
        if prefix in ("block", "adapter") and idx.isdigit():
            runs[prefix].append(int(idx))
        else:
            out.append(name)
    for prefix, idxs in runs.items():
        idxs.sort()
        start = prev = idxs[0]
        for i in idxs[1:] + [None]:
            if i is not None and i == prev + 1:
                prev = i
                continue
            out.append(f"{prefix}_{start}" + (f"-{prev}" if prev != start else ""))
            if i is not None:
                start = prev = i
    return ",".join(out)


def reuse_summary(path: TaskPath) -> str:
    """Where the path's components come from: ``root: ... | <other task>: ... | own: ...``."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name, comp in path.components.items():
        key = "own" if comp.origin == path.task else comp.origin
        groups[key].append(name)
    order = sorted(groups, key=lambda k: (k != "root", k == "own", k))
    return " | ".join(f"{k}: {_compress(groups[k])}" for k in order)


def task_rows(system: System) -> list[dict[str, Any]]:
    """One dict per task with a retained path."""
    rows = []
    for task in system.paths:
        best = system.best_path(task)
        if best is None:
            continue
        rows.append({
            "task": task,
            "test_acc": best.metrics.get("test_quality"),
            "val_acc": best.metrics.get("quality"),
            "params": best.num_params(),
            "accounted": best.accounted_params(),
            "layers": best.num_layers,
            "image_size": best.hparams["ds_image_size"],
            "reuse": reuse_summary(best),
        })
    return rows


def format_table(rows: list[dict[str, Any]], finetune_params: int) -> str:
    """A fixed-width text table plus the averages and the parameters-per-task summary."""
    header = f"{'task':<22} {'test acc':>8} {'val acc':>8} {'params':>11} {'accounted':>11} {'L':>2} {'px':>3}  reuses"
    lines = [header, "-" * len(header)]
    for r in rows:
        test = f"{r['test_acc']:.4f}" if r["test_acc"] is not None else "-"
        lines.append(f"{r['task']:<22} {test:>8} {r['val_acc']:>8.4f} {r['params']:>11,} {r['accounted']:>11,.0f} "
                     f"{r['layers']:>2} {r['image_size']:>3}  {r['reuse']}")
    if rows:
        avg = averages(rows)
        per_task = avg["accounted"]
        lines.append("-" * len(header))
        lines.append(f"average test accuracy {avg['test_acc']:.4f} over {avg['tested']} tasks; "
                     f"parameters per task {per_task:,.0f} ({100 * per_task / finetune_params:.1f}% of "
                     f"fine-tuning the root per task: {finetune_params:,})")
    return "\n".join(lines)


def averages(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The means of a per-task table's columns: ``test_acc`` over the ``tested`` tasks (those with a test
    accuracy), ``val_acc``, ``params`` and ``accounted`` (the parameters per task) over all of them."""
    tests = [r["test_acc"] for r in rows if r["test_acc"] is not None]
    n = max(len(rows), 1)
    return {"test_acc": sum(tests) / max(len(tests), 1), "tested": len(tests),
            "val_acc": sum(r["val_acc"] for r in rows) / n, "params": sum(r["params"] for r in rows) / n,
            "accounted": sum(r["accounted"] for r in rows) / n}

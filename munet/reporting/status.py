"""``munet status``: a run's progress, each task's best path and the store's size, read from the store alone."""

from __future__ import annotations

import json
from pathlib import Path as FsPath
from typing import Any

from munet.config import RunConfig
from munet.reporting.progress import format_seconds
from munet.storage.store import Store


def run_status(run_dir: str | FsPath) -> dict[str, Any]:
    """The status of the run in ``run_dir`` as a dict (see :func:`format_status`)."""
    with Store.open(run_dir) as store:
        return status_of(store)


def status_of(store: Store) -> dict[str, Any]:
    """:func:`run_status` of an open store; its last read (``missing_blobs``) ends a reader's snapshot."""
    run_dir = store.dir
    store.require_records()
    plan, ck, root = store.record("plan"), store.record("checkpoint"), store.root_record()
    tasks = store.task_names()
    best: dict[str, dict[str, Any]] = {}
    for row in sorted(store.retained_paths(), key=_rank):  # the system's best_path: top score, newest
        best[row["task"]] = row
    counts, unique = store.path_counts(), store.unique_params()
    agents = {task: rec.cycle for task, rec in store.agent_records().items()}
    return {
        "run": str(run_dir), "root": root["description"], "root_source": root["source"],
        "root_sha256": root["sha256"], "plan": plan["order"], "done": plan["done"],
        "in_flight": ck["in_flight"], "wall_time_s": store.get("wall_time_s", 0.0),
        "generations_per_iteration": _generations(store.get("config")),
        "tasks": [{"task": t, "path": b["id"], "score": b["score"], "val_acc": b["quality"],
                   "test_acc": b["test_quality"], "params": b["params"], "accounted": b["accounted"]}
                  for t in tasks if (b := best.get(t))],
        "agents": agents, "paths_sampled": counts["sampled"], "paths_accepted": counts["accepted"],
        "unique_params": unique["params"], "blobs": unique["blobs"], "store_bytes": store.sizes(),
        "missing_blobs": store.missing_blobs(),
    }


def _rank(row: dict[str, Any]) -> tuple[float, int]:
    return (row["score"] if row["score"] is not None else float("-inf"), row["id"])


def _generations(cfg: dict[str, Any]) -> int:
    return RunConfig.from_stored(cfg).generations()


def where(s: dict[str, Any]) -> str:
    """Where the run stands: complete, or which task iteration and generation it is in."""
    total, done = len(s["plan"]), s["done"]
    if s["in_flight"]:
        f = s["in_flight"]
        return (f"in progress: task iteration {done + 1}/{total} ({f['task']}), {f['generation']}/"
                f"{s['generations_per_iteration']} generations done")
    if done < total and s.get("agents"):  # an agents run: its checkpoint gathers the publications at the end
        cycles = ", ".join(f"{task} {cycle}" for task, cycle in s["agents"].items())
        return (f"in progress (agents): {sum(s['agents'].values())}/{total} cycles published ({cycles}); the "
                "table shows the publications once every agent has finished")
    if done < total:
        return f"in progress: {done}/{total} task iterations done, next {s['plan'][done]}"
    return f"complete: {total}/{total} task iterations"


def format_status(s: dict[str, Any]) -> str:
    """Human-readable status: progress, the per-task table, and store size against unique parameters."""
    lines = [f"run {s['run']}", f"root: {s['root']} [{s['root_source']}]"
             + (f" sha256 {s['root_sha256'][:16]}" if s["root_sha256"] else ""),
             f"{where(s)}; {s['paths_sampled']} paths sampled, {s['paths_accepted']} accepted; "
             f"wall time {format_seconds(s['wall_time_s'])}", ""]
    header = f"{'task':<22} {'path':>6} {'score':>7} {'val acc':>8} {'test acc':>8} {'params':>11} {'accounted':>11}"
    lines += [header, "-" * len(header)]
    for r in s["tasks"]:
        def num(v: float | None) -> str:
            return f"{v:.4f}" if v is not None else "-"

        lines.append(f"{r['task']:<22} {'#' + str(r['path']):>6} {num(r['score']):>7} {num(r['val_acc']):>8} "
                     f"{num(r['test_acc']):>8} {r['params']:>11,} {r['accounted']:>11,.0f}")
    size = s["store_bytes"]
    params = s["unique_params"]
    lines += ["", f"store: {_mb(size['total'])} ({s['blobs']} blobs {_mb(size['blobs'])}, database "
                  f"{_mb(size['database'])}); unique parameters {params:,} ({_mb(4 * params)} as float32, "
                  f"store / parameters = {size['total'] / max(4 * params, 1):.3f})"]
    if s["missing_blobs"]:
        lines.append(f"warning: {s['missing_blobs']} blob(s) the run references are missing; `munet check {s['run']}` "
                     "says which")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def status_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=1)

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
        plan, ck, root = store.get("plan"), store.get("checkpoint"), store.get("root")
        tasks = store.task_names()
        query = ("SELECT paths.task, paths.id, paths.score, paths.quality, paths.test_quality, paths.params, "
                 "paths.accounted FROM live JOIN paths ON paths.id = live.path_id WHERE live.rank IS NOT NULL")
        best: dict[str, tuple] = {}
        for row in sorted(store.conn.execute(query), key=_rank):  # the system's best_path: top score, newest
            best[row[0]] = row
        n_params, n_blobs = store.conn.execute("SELECT SUM(num_params), COUNT(DISTINCT blob) FROM components"
                                               ).fetchone()
        momentum = store.conn.execute("SELECT COUNT(DISTINCT momentum) FROM components").fetchone()[0]
        sampled = store.conn.execute("SELECT COUNT(*), SUM(accepted) FROM paths").fetchone()
        return {
            "run": str(run_dir), "root": root["description"], "root_source": root["source"],
            "root_sha256": root["sha256"], "plan": plan["order"], "done": plan["done"],
            "in_flight": ck["in_flight"], "wall_time_s": store.get("wall_time_s", 0.0),
            "generations_per_iteration": _generations(store.get("config")),
            "tasks": [{"task": t, "path": b[1], "score": b[2], "val_acc": b[3], "test_acc": b[4], "params": b[5],
                       "accounted": b[6]} for t in tasks if (b := best.get(t))],
            "paths_sampled": sampled[0], "paths_accepted": sampled[1] or 0,
            "unique_params": int(n_params or 0), "blobs": n_blobs + momentum, "store_bytes": store.sizes(),
        }


def _rank(row: tuple) -> tuple[float, int]:
    return (row[2] if row[2] is not None else float("-inf"), row[1])


def _generations(cfg: dict[str, Any]) -> int:
    return RunConfig.from_stored(cfg).generations()


def format_status(s: dict[str, Any]) -> str:
    """Human-readable status: progress, the per-task table, and store size against unique parameters."""
    total, done = len(s["plan"]), s["done"]
    if s["in_flight"]:
        f = s["in_flight"]
        where = (f"in progress: task iteration {done + 1}/{total} ({f['task']}), {f['generation']}/"
                 f"{s['generations_per_iteration']} generations done")
    elif done < total:
        where = f"in progress: {done}/{total} task iterations done, next {s['plan'][done]}"
    else:
        where = f"complete: {total}/{total} task iterations"
    lines = [f"run {s['run']}", f"root: {s['root']} [{s['root_source']}]"
             + (f" sha256 {s['root_sha256'][:16]}" if s["root_sha256"] else ""),
             f"{where}; {s['paths_sampled']} paths sampled, {s['paths_accepted']} accepted; "
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
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def status_json(s: dict[str, Any]) -> str:
    return json.dumps(s, indent=1)

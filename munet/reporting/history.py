"""``munet history``: what evolution did in a run, read from the store alone.

Which mutations were tried and how often a child carrying each was accepted (with the mean change of validation
quality against its parent), for each task the lineage of its best path: the mutations along it and the
hyperparameters that moved away from the root's defaults, and where the training images went (the best path's
lineage, rejected children, accepted side branches, probes). This is the evidence behind "why is task X weak?".

A child's mutations are the ones its record lists plus every dataset hyperparameter (``ds_*``) that differs from its
parent's: dataset hyperparameters are drawn once per generation (all children see the same batches, spec §4.3), so
the child record does not list them itself.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path as FsPath
from typing import Any

from munet.storage.store import Store


def mutation_kind(key: str) -> str:
    """Groups a mutation key: ``clone:block_3`` -> ``clone:block``, ``add:adapter_2`` -> ``add:adapter``;
    hyperparameters keep their name."""
    return re.sub(r"_\d+$", "", key)


def run_generation(metrics: dict[str, Any], per_iteration: int) -> int:
    """Generations of the whole run done when a path's generation ended (from its metrics' ``iteration`` and
    ``generation``): the x axis of the report's and TensorBoard's curves."""
    return metrics.get("iteration", 0) * per_iteration + metrics.get("generation", 0) + 1


#: Mutations that only add trainable capacity to a child (copies of frozen blocks, new adapters), as opposed to
#: changes of hyperparameters or of other components.
STRUCTURAL = frozenset({"clone:block", "add:adapter"})


def mutation_group(kinds: set[str]) -> str:
    """``structural`` when every mutation kind is in :data:`STRUCTURAL`, ``other`` when any is not, ``none``."""
    return "none" if not kinds else "structural" if kinds <= STRUCTURAL else "other"


#: Where a path's training images count (:func:`image_kind`), in the order they are reported.
IMAGE_KINDS = ("lineage", "rejected", "side branches", "probes")


def image_kind(row: dict[str, Any], lineage: set[int]) -> str:
    """Where a path's training images went: its task's best-path ``lineage``, a rejected child, an accepted child
    off that lineage (a side branch), or a probe of the seed phase."""
    if row["id"] in lineage:
        return "lineage"
    if row["metrics"].get("seed_probe"):
        return "probes"
    return "side branches" if row["accepted"] else "rejected"


def _child_mutations(row: dict[str, Any], parent: dict[str, Any] | None) -> dict[str, Any]:
    mutations = dict(row["mutations"])
    if parent is not None:
        for key, value in row["hparams"].items():
            if key.startswith("ds_") and key not in mutations and parent["hparams"].get(key, value) != value:
                mutations[key] = [parent["hparams"][key], value]
    return mutations


def run_history(run_dir: str | FsPath) -> dict[str, Any]:
    """The mutation statistics and best-path lineages of the run in ``run_dir`` (see :func:`format_history`)."""
    with Store.open(run_dir) as store:
        return history_of(store)


def history_of(store: Store) -> dict[str, Any]:
    """:func:`run_history` of an open store."""
    run_dir = store.dir
    tasks = store.task_names()
    root = store.root_record() or {}
    store.retained_paths()  # raises StoreError on a population's path without a score (an edited store)
    rows = {r["id"]: dict(r, accepted=int(r["accepted"]), test=r["test_quality"]) for r in store.sampled_paths()}
    retained = {pid for pid, r in rows.items() if r["retained"]}
    root_id = root.get("path_id", 0)

    stats: dict[str, dict[str, float]] = defaultdict(lambda: {"tried": 0, "accepted": 0, "delta_sum": 0.0})
    groups = {g: {"tried": 0, "accepted": 0} for g in ("structural", "other", "none")}
    def zero(task: str) -> dict[str, Any]:
        return {"task": task, "children": 0, "accepted": 0, "strict_children": 0, "strict_accepted": 0,
                "images": dict.fromkeys(IMAGE_KINDS, 0)}

    per_task = {t: zero(t) for t in tasks}
    for row in rows.values():
        parent = rows.get(row["parent"])
        row["all_mutations"] = _child_mutations(row, parent)
        counts = per_task.setdefault(row["task"], zero(row["task"]))
        counts["children"] += 1
        counts["accepted"] += bool(row["accepted"])
        # only children of the same task face strict acceptance; the others (seed phase) are kept when they validate
        if parent is None or parent["task"] != row["task"]:
            continue
        counts["strict_children"] += 1
        counts["strict_accepted"] += bool(row["accepted"])
        delta = (row["quality"] - parent["quality"]) if None not in (row["quality"], parent["quality"]) else 0.0
        kinds = {mutation_kind(k) for k in row["all_mutations"]}
        group = groups[mutation_group(kinds)]
        group["tried"] += 1
        group["accepted"] += bool(row["accepted"])
        for kind in kinds or {"(none)"}:
            stats[kind]["tried"] += 1
            stats[kind]["accepted"] += bool(row["accepted"])
            stats[kind]["delta_sum"] += delta

    defaults = root.get("hparams", {})  # the root path's: where every lineage's hyperparameters start
    for task, counts in per_task.items():
        best = max((rows[p] for p in retained if p in rows and rows[p]["task"] == task),
                   key=lambda r: (r["score"] if r["score"] is not None else float("-inf"), r["id"]), default=None)
        if best is None:
            continue
        lineage, pid = [], best["id"]
        while pid in rows and rows[pid]["task"] == task:
            lineage.append({"path": pid, "val": rows[pid]["quality"], "mutations": rows[pid]["all_mutations"]})
            pid = rows[pid]["parent"]
        counts.update(best=best["id"], val=best["quality"], test=best["test"], origin=pid,
                      origin_is_root=pid == root_id, lineage=lineage[::-1],
                      moved={k: [defaults[k], v] for k, v in best["hparams"].items()
                             if k in defaults and defaults[k] != v})
    on_lineage = {step["path"] for t in per_task.values() for step in t.get("lineage", [])}
    for row in rows.values():
        per_task[row["task"]]["images"][image_kind(row, on_lineage)] += int(row["metrics"].get("train_images") or 0)
    mutations = [{"kind": k, "tried": int(s["tried"]), "accepted": int(s["accepted"]),
                  "mean_val_delta": s["delta_sum"] / s["tried"]} for k, s in sorted(stats.items())]
    return {"run": str(run_dir), "mutations": mutations, "groups": groups, "tasks": list(per_task.values())}


def _origin(task: dict[str, Any]) -> str:
    return "root" if task.get("origin_is_root") else f"path {task['origin']}"


def describe_mutations(mutations: dict[str, Any]) -> str:
    """One lineage step's mutations as text: hyperparameters with their move (``opt_lr 0.02->0.05``), structural
    mutations by name (``clone:block_3``)."""
    return ", ".join(f"{k} {v[0]}->{v[1]}" if k.startswith(("ds_", "opt_", "num_", "adapter_dim", "_mu"))
                     else k for k, v in mutations.items()) or "no mutation"


def format_history(h: dict[str, Any]) -> str:
    """Human-readable history: a mutation table, each task's best-path lineage, then where the training images
    went."""
    lines = [f"run {h['run']}", "", "mutations in children of the same task (strict acceptance):",
             f"  {'mutation':<28} {'tried':>6} {'accepted':>9} {'rate':>6} {'mean val change':>16}"]
    for m in sorted(h["mutations"], key=lambda m: -m["tried"]):
        rate = m["accepted"] / m["tried"] if m["tried"] else 0.0
        lines.append(f"  {m['kind']:<28} {m['tried']:>6} {m['accepted']:>9} {rate:>6.0%} {m['mean_val_delta']:>+16.4f}")
    lines.append("  children accepted, by what they carry: " + ", ".join(
        f"{name} {g['accepted']}/{g['tried']}" for name, g in h["groups"].items()) + " (structural: only block clones"
        " and adapters)")
    for t in h["tasks"]:
        lines += ["", f"{t['task']}: {t['children']} children, {t['accepted']} accepted "
                      f"({t['strict_accepted']}/{t['strict_children']} under strict acceptance)"]
        if "best" not in t:
            continue
        test = f", test {t['test']:.4f}" if t["test"] is not None else ""
        lines.append(f"  best path {t['best']} (val {t['val']:.4f}{test}), grown from {_origin(t)}:")
        for step in t["lineage"]:
            lines.append(f"    path {step['path']} val {step['val']:.4f}: {describe_mutations(step['mutations'])}")
        moved = ", ".join(f"{k} {a}->{b}" for k, (a, b) in t["moved"].items()) or "none"
        lines.append(f"  hyperparameters moved from the root's defaults: {moved}")
    images = {k: sum(t["images"][k] for t in h["tasks"]) for k in IMAGE_KINDS}
    total = sum(images.values())
    if total:
        lines += ["", f"training images: {total:,}, of which " + ", ".join(
            f"{k} {v / total:.0%}" for k, v in images.items()) + " (lineage: those that trained the best paths)"]
    return "\n".join(lines)

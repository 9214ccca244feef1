"""``munet report``: one self-contained HTML page about a run, read from its store alone (also while it runs).

The page holds the per-task table, the multitask system's picture (tasks against components), the best accuracy
and score of each task over the run's generations, accuracy against parameters (with a quality benchmark's
baselines when given), the hyperparameters along each best path's lineage, the mutation statistics and the
lineages themselves. Its numbers come from ``munet status`` (:func:`run_status`) and ``munet history``
(:func:`run_history`); this module only adds what they do not hold (the components of the best paths, the
generation of every path) and lays it out. Figures are PNGs inside the page (:mod:`munet.reporting.figures`).
"""

from __future__ import annotations

import datetime
import json
import math
from collections.abc import Callable
from pathlib import Path as FsPath
from typing import Any, TextIO

import jinja2

from munet.errors import DataError, MunetError
from munet.model.components import get_kind, kind_of, list_kinds, slot_index
from munet.reporting import figures
from munet.reporting.history import describe_mutations, history_of, run_generation
from munet.reporting.progress import Progress, format_seconds
from munet.reporting.status import status_of, where
from munet.reporting.table import averages
from munet.storage.files import atomic_write
from munet.storage.snapshot import require_buildable
from munet.storage.store import Store, owned_by_store

REPORT_NAME = "report.html"


def slot_order(slot: str) -> tuple[int, int, int]:
    """Sort key of slot names in forward order: the kinds before the layers, the layers (each layer's kinds in
    registry order: its adapter before its block), then the kinds after them."""
    kinds = list_kinds()
    kind = kind_of(slot)
    position = kinds.index(kind.name)
    if kind.indexed:
        return (1, slot_index(slot) or 0, position)
    first_indexed = min(i for i, name in enumerate(kinds) if get_kind(name).indexed)
    return (0 if position < first_indexed else 2, 0, position)


def report_data(run_dir: str | FsPath, baselines_file: str | FsPath | None = None) -> dict[str, Any]:
    """Everything the report shows, as plain records: ``status`` and ``history`` (as ``munet status`` and ``munet
    history`` compute them), the per-task ``rows``, the best paths' components (``slots``, ``cells``), the
    ``curves`` of best accuracy and score, the task ``iterations``, the hyperparameter ``trajectories`` and the
    ``baselines`` of ``baselines_file``."""
    baselines = load_baselines(baselines_file) if baselines_file else []
    with Store.open(run_dir) as store:  # one snapshot: a run in progress may commit meanwhile
        history = history_of(store)
        paths = store.sampled_paths()
        live = {p.id: p for p in store.live_paths()}
        records = store.components()
        config = store.get("config") or {}
        status = status_of(store)  # last: its check for missing blobs ends the snapshot
    tasks = [r["task"] for r in status["tasks"]]
    per_iteration = status["generations_per_iteration"]
    for row in paths:
        row["x"] = run_generation(row["metrics"], per_iteration)
    rows, cells = [], {}
    origins, contents = {c.id: c.origin for c in records}, {c.id: (c.name, c.shape) for c in records}
    for r in status["tasks"]:
        best = live[r["path"]]
        require_buildable(best, contents)  # the slots it shows must be real
        cells[r["task"]] = {slot: (cid, origins.get(cid, "?")) for slot, cid in best.components.items()}
        rows.append(dict(r, layers=best.hparams.get("num_layers"), image_size=best.hparams.get("ds_image_size"),
                         adapters=sum(kind_of(slot).name == "adapter" for slot in best.components)))
    slots = sorted({slot for row in cells.values() for slot in row}, key=slot_order)
    return {"status": status, "history": history, "rows": rows, "averages": averages(rows) if rows else None,
            "tasks": tasks, "slots": slots, "cells": cells, "curves": _curves(paths, tasks),
            "iterations": _iterations(paths, per_iteration), "trajectories": _trajectories(paths, history),
            "baselines": baselines, "config": config}


def _curves(paths: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Best accepted validation accuracy and score of each task so far, at each generation that improved it, and
    at the last generation of the run (so every line reaches the present)."""
    end = max((p["x"] for p in paths), default=0)
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {"accuracy": {}, "score": {}}
    for key, column in (("accuracy", "quality"), ("score", "score")):
        for task in tasks:
            best, points = float("-inf"), []
            for p in sorted(paths, key=lambda p: (p["x"], p["id"])):
                if p["task"] == task and p["accepted"] and p[column] is not None and p[column] > best:
                    best = p[column]
                    points.append((p["x"], best))
            if points:
                points.append((end, best))
            curves[key][task] = points
    return curves


def _iterations(paths: list[dict[str, Any]], per_iteration: int) -> list[tuple[int, int, str]]:
    """``(first generation, end generation, task)`` of each task iteration that sampled a path."""
    tasks = {p["metrics"].get("iteration", 0): p["task"] for p in paths}
    return [(i * per_iteration, i * per_iteration + per_iteration, task) for i, task in sorted(tasks.items())]


def _trajectories(paths: list[dict[str, Any]], history: dict[str, Any]) -> dict[str, dict[str, list[tuple]]]:
    """``hparam -> task -> [(generation, value)]`` along each best path's lineage, for the hyperparameters that
    take more than one value on some lineage or differ between lineages."""
    by_id = {p["id"]: p for p in paths}
    lineages = {t["task"]: [by_id[s["path"]] for s in t.get("lineage", []) if s["path"] in by_id]
                for t in history["tasks"]}
    keys = sorted({k for steps in lineages.values() for p in steps for k in p["hparams"]})
    out: dict[str, dict[str, list[tuple]]] = {}
    for key in keys:
        per_task = {task: [(p["x"], p["hparams"][key]) for p in steps if key in p["hparams"]]
                    for task, steps in lineages.items() if steps}
        if len({json.dumps(v) for points in per_task.values() for _, v in points}) > 1:
            out[key] = per_task
    return out


def load_baselines(file: str | FsPath) -> list[dict[str, Any]]:
    """The methods of a quality-benchmark results file (``benchmarks/results/quality.json``), each with its
    ``method`` name, ``params_per_task`` and per-task ``test_acc``.

    Raises:
        DataError: the file is missing, not JSON, or holds no such methods.
    """
    file = FsPath(file)
    try:
        results = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise DataError(f"baselines file {file} does not exist; pass a quality benchmark's results file, e.g. "
                        "benchmarks/results/quality.json") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"baselines file {file} is not a quality benchmark's JSON results file: {err}") from err
    except OSError as err:
        raise DataError(f"baselines file {file} cannot be read: {err.strerror or err}") from err
    methods = results.get("methods") if isinstance(results, dict) else None
    keys = ("method", "params_per_task", "test_acc")
    if not isinstance(methods, list) or not all(isinstance(m, dict) and all(k in m for k in keys) for m in methods):
        raise DataError(f"baselines file {file} holds no list of methods with {', '.join(keys)}; pass a quality "
                        "benchmark's results file, e.g. benchmarks/results/quality.json")
    for m in methods:
        if problem := _method_problem(m):
            raise DataError(f"baselines file {file}: method {m['method']!r} {problem}")
    return [{k: m[k] for k in keys} for m in methods]


def _method_problem(method: dict[str, Any]) -> str | None:
    """What is wrong with one method of a baselines file (``None``: nothing)."""
    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    if not isinstance(method["method"], str):
        return "has a name that is not a string"
    if not number(method["params_per_task"]) or method["params_per_task"] <= 0:
        return f"has params_per_task {method['params_per_task']!r}, expected a positive number"
    acc = method["test_acc"]
    if not isinstance(acc, dict) or not all(number(v) and 0 <= v <= 1 for v in acc.values()):
        return f"has test_acc {acc!r}, expected {{task: accuracy in [0, 1]}}"
    return None


def render(data: dict[str, Any], stream: TextIO | None = None) -> str:
    """The HTML page of :func:`report_data`'s records, with the progress of drawing its figures on ``stream``."""
    tasks = data["tasks"]
    drawings: list[tuple[str, str, Callable[[], Any]]] = []
    if data["cells"]:
        drawings.append(("system", "The multitask system",
                         lambda: figures.system_figure(tasks, data["slots"], data["cells"])))
    if any(data["curves"]["accuracy"].values()):
        drawings.append(("progress", "Best accuracy and score over the run",
                         lambda: figures.progress_figure(tasks, data["curves"], data["iterations"])))
    if data["rows"]:
        munet = {r["task"]: (r["accounted"], r["test_acc"] if r["test_acc"] is not None else r["val_acc"])
                 for r in data["rows"]}
        drawings.append(("quality", "Accuracy against parameters",
                         lambda: figures.quality_params_figure(tasks, munet, data["baselines"])))
    if data["trajectories"]:
        drawings.append(("hparams", "Hyperparameters along each best path's lineage",
                         lambda: figures.hparam_figure(tasks, data["trajectories"])))
    if data["history"]["mutations"]:
        drawings.append(("mutations", "Mutations: tried, accepted, effect",
                         lambda: figures.mutation_figure(data["history"]["mutations"])))
    images = {}
    progress = Progress(len(drawings), stream, unit="figure", quiet=None if stream else True)
    try:
        for name, _, draw in drawings:
            progress.label = f"report: {name}"
            images[name] = figures.to_data_uri(draw())
            progress.advance()
    finally:
        progress.close()
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters["acc"] = lambda v: "-" if v is None else f"{v:.4f}"
    env.filters["count"] = lambda v: "-" if v is None else f"{v:,.0f}"
    env.filters["signed"] = lambda v: f"{v:+.4f}"
    cfg = data["config"]
    mu = (f"mutation probability fixed at {cfg.get('mutation_prob')} (mu_policy fixed)"
          if cfg.get("mu_policy", "fixed") == "fixed" else f"mu_policy {cfg.get('mu_policy')}")
    return env.from_string(TEMPLATE).render(
        d=data, s=data["status"], where=where(data["status"]), images=images,
        titles={name: title for name, title, _ in drawings}, describe=describe_mutations,
        wall=format_seconds(data["status"]["wall_time_s"]), mu=mu,
        generated=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(run_dir: str | FsPath, out: str | FsPath | None = None, baselines_file: str | FsPath | None = None,
                 stream: TextIO | None = None) -> FsPath:
    """Writes the report of the run in ``run_dir`` to ``out`` (default ``RUN/report.html``) and returns its path;
    the store is only read, so this works while the run goes on. ``stream``: where to show progress (none: no
    progress)."""
    target = report_target(run_dir, out)
    html = render(report_data(run_dir, baselines_file), stream)
    try:
        if target.exists() and not target.is_file():  # a device or a pipe (/dev/stdout): written to, never replaced
            target.write_text(html)
        else:  # through a symbolic link: the file it points to is replaced, not the link
            atomic_write(target.resolve() if target.is_symlink() else target, html)
    except BrokenPipeError:  # `--out /dev/stdout | head`: the reader went away, the CLI stops quietly
        raise
    except OSError as err:
        raise MunetError(f"cannot write the report to {target}: {err.strerror or err}; choose a writable file with "
                         "--out FILE") from err
    return target


def report_target(run_dir: str | FsPath, out: str | FsPath | None) -> FsPath:
    """The file a report goes to: ``out``, or ``RUN/report.html``; checked before the report is rendered.

    Raises:
        MunetError: ``out`` is empty, a directory, in a folder that does not exist, one of a run store's files, or
            an existing file that is not a munet report (only an earlier report is replaced).
    """
    if out is None:
        target = FsPath(run_dir) / REPORT_NAME
    elif not str(out).strip():
        raise MunetError(f"--out is empty: give the HTML file to write, e.g. --out {REPORT_NAME}")
    else:
        target = FsPath(out)
        if target.is_dir():
            raise MunetError(f"--out {target} is a directory: give the HTML file to write, e.g. --out "
                             f"{target / REPORT_NAME}")
        if not target.parent.is_dir():
            raise MunetError(f"--out {target}: its folder {target.parent} does not exist; create it or choose another "
                             "file")
    if owned_by_store(target.resolve()):
        raise MunetError(f"--out {target} is one of a run store's own files; choose another file, e.g. --out "
                         f"{FsPath(run_dir) / REPORT_NAME}")
    if target.is_file() and target.stat().st_size and not _is_report(target):
        raise MunetError(f"--out {target} exists and is not a munet report: a report replaces only an earlier "
                         "report; choose another file, or move that one away")
    return target


def _is_report(file: FsPath) -> bool:
    """Whether ``file`` begins as :data:`TEMPLATE`'s pages do (an unreadable file counts as one: writing says why)."""
    try:
        with open(file, "rb") as f:
            head = f.read(1024)
    except OSError:
        return True
    return head.startswith(b"<!DOCTYPE html>") and b"<title>munet report" in head


TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>munet report: {{ s.run }}</title>
<style>
 body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
        background: #fafafa; }
 main { max-width: 1200px; margin: 0 auto; padding: 1.2em 2em 3em; background: white; }
 h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 2em;
      border-bottom: 1px solid #ddd; padding-bottom: 0.2em; } h3 { font-size: 1em; margin-bottom: 0.3em; }
 .meta { color: #555; margin: 0.1em 0; }
 table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
 th, td { padding: 0.25em 0.7em; border-bottom: 1px solid #e5e5e5; text-align: right; }
 th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
 td.text, th.text { text-align: left; } tr.avg td { font-weight: 600; border-top: 2px solid #bbb; }
 figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; }
 figcaption { color: #555; font-size: 0.9em; max-width: 60em; }
 .lineage { columns: 2 32em; column-gap: 2.5em; } .lineage section { break-inside: avoid; margin-bottom: 1em; }
 .lineage table { width: 100%; } .lineage td { font-size: 0.88em; }
</style></head>
<body><main>
<h1>munet report</h1>
<p class="meta">run <code>{{ s.run }}</code> &middot; root {{ s.root }}</p>
<p class="meta">{{ where }}; {{ s.paths_sampled }} paths sampled, {{ s.paths_accepted }} accepted; wall time
 {{ wall }} &middot; report generated {{ generated }}</p>

<h2 id="tasks">Tasks</h2>
{% if d.rows %}
<table id="task-table">
<thead><tr><th>task</th><th>path</th><th>val acc</th><th>test acc</th><th>params</th><th>accounted params</th>
<th>image size</th><th>layers</th><th>adapters</th></tr></thead>
<tbody>
{% for r in d.rows %}<tr><td>{{ r.task }}</td><td>#{{ r.path }}</td><td>{{ r.val_acc | acc }}</td>
<td>{{ r.test_acc | acc }}</td><td>{{ r.params | count }}</td><td>{{ r.accounted | count }}</td>
<td>{{ r.image_size }}</td><td>{{ r.layers }}</td><td>{{ r.adapters }}</td></tr>
{% endfor %}
<tr class="avg"><td>average</td><td></td><td>{{ d.averages.val_acc | acc }}</td><td>{{ d.averages.test_acc | acc }}
{% if d.averages.tested < d.rows | length %} ({{ d.averages.tested }} tasks){% endif %}</td>
<td>{{ d.averages.params | count }}</td><td>{{ d.averages.accounted | count }}</td><td></td><td></td><td></td></tr>
</tbody></table>
<p class="meta">params: all parameters of the task's best path; accounted: each shared component's parameters
divided among the tasks that use it (the paper's parameters per task). Test accuracy is measured when a task
iteration ends.</p>
{% else %}<p>No task has a retained path yet.</p>{% endif %}

{% for name, title in titles.items() %}
<h2 id="{{ name }}">{{ title }}</h2>
<figure><img id="fig-{{ name }}" src="{{ images[name] }}" alt="{{ title }}">
<figcaption>
{% if name == "system" %}Rows: tasks; columns: component slots in forward order. Each cell is the component the
task's best path uses: grey ones are the pretrained root's, coloured ones were cloned or added (adapters, hatched)
and trained by the task of that colour; the same number in several rows is one shared component.
{% elif name == "progress" %}Best validation accuracy and score among each task's accepted paths so far, against
the generations of the whole run; a task improves only during its own task iterations.
{% elif name == "quality" %}Accuracy (test; validation until tested) against the parameters accounted to each
task{% if d.baselines %}, with the quality benchmark's methods as hollow grey markers{% endif %}.
{% elif name == "hparams" %}The hyperparameters that changed along some best path's lineage, at the generation of
each step; {{ mu }}.
{% elif name == "mutations" %}Children of the same task carrying each kind of mutation (strict acceptance), how
many were accepted, and their mean change of validation accuracy against their parent.{% endif %}
</figcaption></figure>
{% endfor %}

{% if d.history.mutations %}
<table id="mutation-table">
<thead><tr><th>mutation</th><th>tried</th><th>accepted</th><th>rate</th><th>mean val change</th></tr></thead>
<tbody>{% for m in d.history.mutations | sort(attribute="tried", reverse=True) %}
<tr><td>{{ m.kind }}</td><td>{{ m.tried }}</td><td>{{ m.accepted }}</td>
<td>{{ "%.0f%%" | format(100 * m.accepted / m.tried) if m.tried else "-" }}</td>
<td>{{ m.mean_val_delta | signed }}</td></tr>{% endfor %}
</tbody></table>
{% endif %}

<h2 id="lineage">Lineage of each best path</h2>
<div class="lineage">
{% for t in d.history.tasks if t.best is defined %}
<section><h3>{{ t.task }}: path #{{ t.best }} (val {{ t.val | acc }}, test {{ t.test | acc }})</h3>
<p class="meta">grown from {{ "the root" if t.origin_is_root else "path #%s" % t.origin }};
{{ t.children }} children, {{ t.accepted }} accepted</p>
<table><thead><tr><th>path</th><th>val</th><th class="text">mutations</th></tr></thead><tbody>
{% for step in t.lineage %}<tr><td>#{{ step.path }}</td><td>{{ step.val | acc }}</td>
<td class="text">{{ describe(step.mutations) }}</td></tr>{% endfor %}
</tbody></table></section>
{% endfor %}
</div>
</main></body></html>
"""

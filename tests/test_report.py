"""``munet report``: the HTML page of a run, from its store alone, finished or in progress."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import pytest
from conftest import make_run, tiny_config
from PIL import Image

from munet.cli import main
from munet.reporting.history import run_generation
from munet.reporting.report import report_data, slot_order, write_report
from munet.reporting.status import run_status
from munet.runner import Run
from munet.storage.store import Store


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("report") / "run"
    make_run(out)
    return out


class Page(HTMLParser):
    """The parts of a report a reader sees: table cells by table id, and the images."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table":
            self._table = a.get("id") or f"table{len(self.tables)}"
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images[a["id"] or ""] = a["src"] or ""

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None


def parse(html: str) -> Page:
    page = Page()
    page.feed(html)
    return page


def png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).size


def test_report_shows_the_runs_table_figures_and_lineages(run_dir, tmp_path, capsys):
    db = (run_dir / "munet.db").read_bytes()
    target = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--out", str(target)]) == 0
    assert str(target) in capsys.readouterr().out
    assert (run_dir / "munet.db").read_bytes() == db  # the store is only read
    html = target.read_text()
    page = parse(html)
    status = run_status(run_dir)
    rows = {r[0]: r for r in page.tables["task-table"][1:]}
    assert set(rows) == {"a", "b", "average"}
    for t in status["tasks"]:
        assert rows[t["task"]][1:4] == [f"#{t['path']}", f"{t['val_acc']:.4f}", f"{t['test_acc']:.4f}"]
        assert rows[t["task"]][5] == f"{t['accounted']:,.0f}"
    mean_test = sum(t["test_acc"] for t in status["tasks"]) / 2
    assert rows["average"][3] == f"{mean_test:.4f}"
    assert set(page.images) >= {"fig-system", "fig-progress", "fig-quality", "fig-mutations"}
    for uri in page.images.values():
        width, height = png_size(uri)
        assert width > 300 and height > 150
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # nothing to fetch
    assert "complete: 2/2 task iterations" in html
    for t in status["tasks"]:  # each lineage ends at the task's best path
        assert f"{t['task']}: path #{t['path']} (val {t['val_acc']:.4f}" in html
    assert [r[0] for r in page.tables["mutation-table"][1:]]  # mutation statistics as a table too


def test_report_records_follow_the_store(run_dir):
    data = report_data(run_dir)
    best = {t["task"]: t["path"] for t in data["status"]["tasks"]}
    assert data["slots"][0] == "embedding" and data["slots"][-1] == "head"
    blocks = [s for s in data["slots"] if s.startswith("block_")]
    assert blocks == [f"block_{i}" for i in range(len(blocks))]
    for task, cells in data["cells"].items():
        assert cells["head"][1] == task  # each task trains its own head
    with Store.open(run_dir) as store:
        root_ids = set(store.get("root")["components"].values())
    for cells in data["cells"].values():
        for slot, (cid, origin) in cells.items():
            # grey where the root's component is (or the root's position embedding resized for an image size)
            assert origin == "root" if cid in root_ids else origin in ("root", "a", "b"), slot
    for task, points in data["curves"]["accuracy"].items():
        values = [v for _, v in points]
        assert values == sorted(values)  # best so far never drops
        assert points[-1][0] == max(p for p, _ in points)
        assert values[-1] == pytest.approx(next(r["val_acc"] for r in data["rows"] if r["task"] == task))
    assert [task for _, _, task in data["iterations"]] == ["a", "b"]
    assert set(best) == {"a", "b"}


def test_slot_order_is_forward_order():
    slots = ["head", "block_1", "adapter_1", "norm", "block_0", "posembed", "cls", "embedding", "block_10", "block_2"]
    assert sorted(slots, key=slot_order) == ["embedding", "cls", "posembed", "block_0", "adapter_1", "block_1",
                                             "block_2", "block_10", "norm", "head"]


def test_report_of_a_run_in_progress(tmp_path, one_thread):
    cfg = tiny_config(tmp_path / "run")
    with Run.create(cfg, io.StringIO()) as run:
        assert "No task has a retained path yet." in write_report(cfg.out).read_text()
        run.step()  # one generation of the first task iteration, saved; the run holds its store open for writing
        target = write_report(cfg.out)
        html = target.read_text()
    assert target == tmp_path / "run" / "report.html"
    assert "in progress: task iteration 1/2 (a), 1/" in html
    assert "fig-system" in html and "fig-progress" in html


def test_report_with_baselines(run_dir, tmp_path):
    results = {"methods": [{"method": "finetune", "params_per_task": 40_000, "test_acc": {"a": 0.5, "b": 0.9}},
                           {"method": "adapters:8", "params_per_task": 3_000, "test_acc": {"a": 0.4}}]}
    file = tmp_path / "quality.json"
    file.write_text(json.dumps(results))
    html = write_report(run_dir, tmp_path / "r.html", file).read_text()
    assert "hollow grey markers" in html
    without = write_report(run_dir, tmp_path / "r0.html").read_text()
    figure = re.compile(r'id="fig-quality" src="([^"]+)"')
    # one panel per task with the baselines, one panel for all without
    assert png_size(figure.search(html).group(1))[0] > png_size(figure.search(without).group(1))[0]


def test_bad_baselines_file_is_a_clear_error(run_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"methods": [{"method": "x"}]}))
    entries = {"flat": ({"test_acc": 0.95}, "has test_acc 0.95, expected {task: accuracy in [0, 1]}"),
               "none": ({"test_acc": None}, "has test_acc None"), "word": ({"test_acc": {"a": "high"}}, "'high'"),
               "text": ({"params_per_task": "1e6"}, "has params_per_task '1e6', expected a positive number")}
    cases = [(tmp_path / "missing.json", "does not exist"), (bad, "no list of methods"), (tmp_path, "cannot be read")]
    for name, (entry, words) in entries.items():  # one malformed method of an otherwise good file
        file = tmp_path / f"{name}.json"
        method = {"method": name, "params_per_task": 1_000, "test_acc": {"a": 0.5}, **entry}
        file.write_text(json.dumps({"methods": [method]}))
        cases.append((file, f"method {name!r} has") if name == "word" else (file, f"method {name!r} {words}"))
    for file, words in cases:
        assert main(["report", str(run_dir), "--out", str(tmp_path / "r.html"), "--baselines", str(file)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: baselines file") and words in err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err



def test_tensorboard_log_holds_every_childs_curve_and_decision(tmp_path, one_thread):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    make_run(out, log="tensorboard")
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    with Store.open(out) as store:
        paths = store.sampled_paths()
    per_iteration = run_status(out)["generations_per_iteration"]
    for p in paths:
        curve = [e.value for e in events.Scalars(f"children/{p['task']}/path_{p['id']:05d}")]
        assert curve == pytest.approx(p["metrics"]["evals"])
    for task in ("a", "b"):
        decisions = {e.step: e.value for e in events.Scalars(f"accepted/{task}")}
        assert decisions == {p["id"]: float(p["accepted"]) for p in paths if p["task"] == task}
        best = events.Scalars(f"best_val/{task}")
        assert best[-1].value == pytest.approx(max(p["quality"] for p in paths if p["task"] == task and p["accepted"]))
    last = max(run_generation(p["metrics"], per_iteration) for p in paths)
    assert [e.step for e in events.Scalars("task_iteration")][-1] == last
    assert {"best_test/a", "acceptance_rate/b"} <= tags


def test_unknown_log_is_a_config_error(tmp_path, capsys):
    assert main(["run", "--log", "wandb", "--out", str(tmp_path / "x")]) == 2
    assert "log must be one of" in capsys.readouterr().err

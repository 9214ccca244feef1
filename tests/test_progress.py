"""Progress: a tqdm bar on a terminal, plain lines otherwise, nothing with ``munet -q``."""

from __future__ import annotations

import io
import logging
import re

from conftest import TINY_ROOT

from munet.cli import main
from munet.reporting.progress import Progress
from munet.storage.store import Store


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_bar_with_eta_and_notes_above_it():
    screen = Terminal()
    progress = Progress(100, screen, unit="step", quiet=False, min_interval=0)
    progress.label = "[1/2] a"
    progress.advance(50)
    progress.note("gen 1/4 accepted 1/1")
    progress.close()
    text = screen.getvalue()
    assert "\r" in text and "[1/2] a" in text and "50/100" in text and "<" in text  # tqdm's elapsed<remaining
    assert "gen 1/4 accepted 1/1\n" in text


def test_a_log_file_gets_plain_lines_only():
    log = io.StringIO()
    progress = Progress(10, log, quiet=False)
    progress.label = "[1/1] a"
    progress.advance(5)
    progress.note(progress.line())
    progress.close()
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue()
    assert log.getvalue().startswith("[1/1] a |  50.0% | elapsed ")


def test_quiet_prints_nothing_and_eta_ignores_work_done_before():
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(10, stream, done=4, quiet=True)
        assert progress.eta() != progress.eta()  # NaN: nothing measured in this session yet
        progress.advance(2)
        progress.note("x")
        progress.close()
        assert stream.getvalue() == "" and progress.done == 6 and progress.eta() >= 0


def test_units_found_done_count_towards_the_bar_not_the_rate():
    progress = Progress(10, Terminal(), quiet=False, min_interval=0)
    progress.skip(3)  # a benchmark's stored units
    assert progress.done == 3 and progress.bar.n == 3
    assert progress.eta() != progress.eta()  # NaN: nothing trained in this session yet
    progress.advance()
    assert progress.eta() >= 0
    progress.close()


def test_munet_quiet_run_prints_no_progress(tmp_path, capsys, one_thread):
    common = ["--root", TINY_ROOT, "--tasks", "a", "--depth", "1", "--image-size", "8", "--max-image-size", "8",
              "--children-per-task", "2", "--steps-between-validations", "1", "--validations", "1",
              "--max-val-examples", "16", "--batch-size", "8", "--device", "cpu"]
    try:
        assert main(["-q", "run", *common, "--out", str(tmp_path / "quiet")]) == 0
        quiet = capsys.readouterr()
        assert main(["run", *common, "--out", str(tmp_path / "loud")]) == 0
        loud = capsys.readouterr()
    finally:
        logging.getLogger("munet").setLevel(logging.WARNING)
    assert "gen 1/" in loud.out and "gen 1/" not in quiet.out + quiet.err
    assert "average test accuracy" in quiet.out  # the result is still printed



def test_twins_grow_the_total_so_a_run_ends_at_100_percent(tmp_path, capsys, one_thread):
    """mutation_twins adds children past the plan; the progress total grows by their steps, never past 100 %."""
    out = tmp_path / "twins"
    args = ["run", "--root", TINY_ROOT, "--tasks", "a,b", "--depth", "2", "--image-size", "8", "--max-image-size", "8",
            "--children-per-task", "4", "--steps-between-validations", "1", "--validations", "2",
            "--max-val-examples", "16", "--batch-size", "8", "--device", "cpu", "--out", str(out),
            "--set", "mutation_twins=true", "--set", "mutation_prob=0.9"]
    try:
        assert main(args) == 0
    finally:
        logging.getLogger("munet").setLevel(logging.WARNING)
    printed = capsys.readouterr()
    shares = [float(m) for m in re.findall(r"\|\s*([0-9.]+)% \|", printed.out + printed.err)]
    with Store.open(out) as store:
        twins = [p for p in store.sampled_paths() if "twin_of" in p["metrics"]]
    assert twins and shares  # mutation_prob 0.9 draws hyperparameter moves: twins train
    assert max(shares) <= 100.0  # below at the end: the plan counts probes of tasks not yet evolved


def test_export_all_writes_every_task(tmp_path, capsys, one_thread):
    import json

    from conftest import make_run

    import munet

    make_run(tmp_path / "run")
    assert main(["export", str(tmp_path / "run"), "--task", "all", "--separate", "--out",
                 str(tmp_path / "models")]) == 0
    out = capsys.readouterr().out
    system = munet.load(tmp_path / "run")
    for task in ("a", "b"):
        assert f"exported {task} to {tmp_path / 'models' / task / 'model.safetensors'}" in out
        config = json.loads((tmp_path / "models" / task / "config.json").read_text())
        assert config["source"]["path_id"] == system.path(task).id

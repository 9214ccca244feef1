"""The ``munet`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import select
import shlex
import sys
from pathlib import Path
from typing import Any

from munet.config import RunConfig, load_config_file
from munet.configs import PRESETS, describe, get_preset
from munet.errors import MunetError
from munet.serving import MAX_READ_S, MAX_WAIT_MS
from munet.storage.database import DB_NAME


def _field_help() -> dict[str, str]:
    """Per-field help text, read from the Attributes section of RunConfig's docstring (one source of truth)."""
    doc = (RunConfig.__doc__ or "").split("Attributes:", 1)[-1]
    entries = re.split(r"\n\s{8}(?=\w+: )", "\n" + doc)
    return {e.split(":", 1)[0].strip(): " ".join(e.split(":", 1)[1].split()) for e in entries if ":" in e}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)} (default: default)")
    parser.add_argument("--config", default=None, help="TOML or JSON file of key = value overrides")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any key")
    helps = _field_help()
    for f in dataclasses.fields(RunConfig):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f"cfg_{f.name}", default=None, metavar=f.name.upper(),
                            help=helps.get(f.name, "") + (" (comma-separated)" if f.name == "tasks" else ""))


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config-file values, then ``--set`` pairs, then explicit flags (later wins)."""
    changes: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for item in args.set:
        if "=" not in item:
            raise MunetError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        changes[key.strip().replace("-", "_")] = value
    for f in dataclasses.fields(RunConfig):
        value = getattr(args, f"cfg_{f.name}")
        if value is not None:
            changes[f.name] = value
    return changes


def build_config(args: argparse.Namespace) -> RunConfig:
    """The run configuration from preset, config file and command-line overrides, validated; relative paths of
    ``folder:`` and ``npz:`` tasks are made absolute, since the run stores them and may be resumed from anywhere."""
    from munet.data.user import absolute_spec

    # "" (an unset variable in a script) is named as an unknown preset, not read as the default
    cfg = get_preset("default" if args.preset is None else args.preset).replace(**_overrides(args)).validate()
    return cfg.replace(tasks=[absolute_spec(t) for t in cfg.tasks])


def _cmd_run(args: argparse.Namespace) -> int:
    from munet.runner import run

    if args.dry_run:
        from munet.plan import format_plan, plan_run

        print(format_plan(plan_run(build_config(args), sys.stdout)))
        return 0
    cfg = build_config(args)
    args.out = cfg.out  # resolved (flag, config file or preset): where an interrupt's message points
    run(cfg)
    return 0


def _cmd_add_task(args: argparse.Namespace) -> int:
    from munet.data.user import absolute_spec
    from munet.runner import add_tasks

    if args.preset:  # a preset is a whole configuration; the run's own stays, apart from single keys
        raise MunetError("add-task keeps the run's configuration, so --preset does not apply; change single keys "
                         "with --set KEY=VALUE")
    from munet.data.registry import split_specs

    tasks = [absolute_spec(t) for given in args.tasks for t in split_specs(given)]
    if not tasks:  # "add-task RUN ," once read as "no new task to add:  already in RUN"
        raise MunetError(f"add-task: {' '.join(map(repr, args.tasks))} names no task; give task specs to add")
    add_tasks(args.run_dir, tasks, _overrides(args))
    return 0


def _cmd_resume(args: argparse.Namespace) -> int:
    from munet.runner import OPERATIONAL_KEYS, resume

    overrides = {k: getattr(args, f"cfg_{k}") for k in OPERATIONAL_KEYS if getattr(args, f"cfg_{k}", None) is not None}
    resume(args.run_dir, overrides)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from munet.reporting.status import format_status, run_status, status_json

    status = run_status(args.run_dir)
    print(status_json(status) if args.json else format_status(status))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from munet.reporting.history import format_history, run_history

    history = run_history(args.run_dir)
    print(json.dumps(history, indent=1) if args.json else format_history(history))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from munet.reporting.report import write_report

    target = write_report(args.run_dir, args.out, args.baselines, stream=sys.stderr)
    print(f"report written to {target}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from munet.storage.check import check_store

    report = check_store(args.run_dir, data=args.data)
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}")
    counts = ", ".join(f"{n} {what}" for what, n in report.counts.items()) or "what could be read"
    if report.problems:
        print(f"{args.run_dir}: {len(report.problems)} problem(s) found (checked {counts})")
        return 1
    print(f"{args.run_dir}: ok (checked {counts})")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    import munet
    from munet.reporting.progress import Progress

    if not args.out.strip():  # checked here too: --separate writes OUT/TASK, which is not empty
        raise MunetError("--out is empty: name the directory to export into, e.g. --out exported")
    if args.task != "all" and args.separate:
        raise MunetError(f"--separate exports every task into its own directory: it goes with --task all, not --task "
                         f"{args.task}")
    system = munet.load(args.run_dir)
    if args.task != "all":
        target = system.export(args.task, args.out, args.format)
        print(f"exported {args.task} to {target} (with {target.parent / 'config.json'})")
        return 0
    if not args.separate:
        target = system.export_all(args.out, args.format)
        print(f"exported {', '.join(system.tasks)} to {target} (with {target.parent / 'config.json'})")
        return 0
    tasks = system.tasks_of("all")
    progress = Progress(len(tasks), sys.stderr, unit="task")  # bar on stderr, a line per task on stdout
    try:
        for task in tasks:
            progress.label = f"export {task}"
            target = system.export(task, Path(args.out) / task, args.format)
            progress.advance()
            print(f"exported {task} to {target} (with {target.parent / 'config.json'})")
    finally:
        progress.close()
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    import munet
    from munet.predict import as_records, format_predictions

    if args.top < 1:  # a slice [:k] with k <= 0 would print all labels but -k, or none
        raise MunetError(f"--top must be >= 1 (the number of most probable labels to print), got {args.top}")
    system = munet.load(args.run_dir)
    answers = system.predict(args.files, task=args.task)
    answers = answers if isinstance(answers, dict) else {args.task: answers}
    if args.json:
        print(json.dumps(as_records(args.files, answers), indent=1))
    else:
        print(format_predictions(args.files, answers, system.class_names, args.top))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from munet.serving import require_serve_extra

    require_serve_extra()
    from munet.serving.app import Limits
    from munet.serving.server import serve

    if not 0 <= args.port <= 65535:
        raise MunetError(f"--port must be in 0-65535 (0: a free port), got {args.port}")
    limits = Limits(max_batch_images=args.max_batch, max_wait_ms=args.max_wait_ms,  # checks all three
                    read_timeout_s=args.read_timeout_s)
    from munet.data.registry import split_specs

    tasks = split_specs(args.tasks) if args.tasks is not None else None
    if tasks == []:  # "--tasks ," or "--tasks ''" once served every task
        raise MunetError(f"--tasks {args.tasks!r} names no task; give task names, or leave --tasks out to serve all")
    try:
        serve(args.run_dir, args.host, args.port, tasks, limits, stream=sys.stdout)
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl-C, then usually raises it again
        pass
    print("server stopped", file=sys.stderr)  # also when uvicorn returned without re-raising the captured signal
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from munet.data.registry import TASKS

    for name in TASKS:
        print(name)
    print("also: folder:PATH, npz:PATH, torchvision:NAME, hf:NAME, split:TASK:a-b")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    for name in PRESETS:
        print(f"{name:<10} {describe(name)}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="munet", description="Evolve a pretrained ViT into a multitask system.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or lines, errors only")
    sub = parser.add_subparsers(dest="command")
    run_p = sub.add_parser("run", help="evolve a new system, or resume the run already in --out (no arguments: the "
                                       "offline default)")
    _add_config_args(run_p)
    run_p.add_argument("--dry-run", action="store_true", help="print the plan (tasks, children, steps, estimated "
                       "images and memory) without training or creating the run directory")
    run_p.set_defaults(func=_cmd_run)
    add_p = sub.add_parser("add-task", help="introduce new tasks into an existing run (one task iteration each)")
    add_p.add_argument("run_dir", help="run directory of an earlier `munet run`")
    add_p.add_argument("tasks", nargs="+", help="task specs to add (separated by spaces or commas)")
    _add_config_args(add_p)
    add_p.set_defaults(func=_cmd_add_task)
    res_p = sub.add_parser("resume", help="continue an interrupted run from its last checkpoint")
    res_p.add_argument("run_dir", help="run directory")
    changeable = ("device", "threads", "feature_cache_mb", "data_cache_mb", "data_dir", "log", "executor",
                  "ray_address")
    for key in changeable:  # the keys a resumed run may change
        res_p.add_argument("--" + key.replace("_", "-"), dest=f"cfg_{key}", default=None, metavar=key.upper())
    res_p.set_defaults(func=_cmd_resume)
    st_p = sub.add_parser("status", help="progress, each task's best path, store size")
    st_p.add_argument("run_dir", help="run directory")
    st_p.add_argument("--json", action="store_true", help="print the status as JSON")
    st_p.set_defaults(func=_cmd_status)
    hi_p = sub.add_parser("history", help="which mutations were tried and accepted; each best path's lineage")
    hi_p.add_argument("run_dir", help="run directory")
    hi_p.add_argument("--json", action="store_true", help="print the history as JSON")
    hi_p.set_defaults(func=_cmd_history)
    rp_p = sub.add_parser("report", help="one self-contained HTML page of a run (tables and figures; also while "
                                         "it runs)")
    rp_p.add_argument("run_dir", help="run directory")
    rp_p.add_argument("--out", default=None, help="HTML file to write (default: RUN/report.html)")
    rp_p.add_argument("--baselines", default=None, metavar="FILE", help="a quality benchmark's results "
                      "(benchmarks/results/quality.json): its methods become baseline points")
    rp_p.set_defaults(func=_cmd_report)
    ck_p = sub.add_parser("check", help="verify every blob and reference of a run directory (exit 1 on problems)")
    ck_p.add_argument("run_dir", help="run directory")
    ck_p.add_argument("--data", action="store_true", help="also load every task's data and compare it with the "
                      "fingerprint stored when the task joined the run")
    ck_p.set_defaults(func=_cmd_check)
    ex_p = sub.add_parser("export", help="write one task's model as a self-contained directory")
    ex_p.add_argument("run_dir", help="run directory")
    ex_p.add_argument("--task", required=True, help="the task to export, or `all`: every task in one model (one "
                      "output per task, shared components once)")
    ex_p.add_argument("--separate", action="store_true", help="with --task all: each task as its own model, in "
                      "OUT/TASK")
    ex_p.add_argument("--out", required=True, help="output directory (model file + config.json)")
    ex_p.add_argument("--format", default="safetensors", choices=["safetensors", "onnx"], help="model file format")
    ex_p.set_defaults(func=_cmd_export)
    pr_p = sub.add_parser("predict", help="labels and probabilities for image files")
    pr_p.add_argument("run_dir", help="run directory")
    pr_p.add_argument("--task", required=True, help="a task name, or `all` for every task")
    pr_p.add_argument("files", nargs="+", help="image files")
    pr_p.add_argument("--top", type=int, default=1, help="print the K most probable labels (default 1)")
    pr_p.add_argument("--json", action="store_true", help="print every probability as JSON")
    pr_p.set_defaults(func=_cmd_predict)
    sv_p = sub.add_parser("serve", help="answer predictions over HTTP (needs `pip install -e .[serve]`)")
    sv_p.add_argument("run_dir", help="run directory (a run still training is served from its last checkpoint)")
    sv_p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv_p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free port, printed)")
    sv_p.add_argument("--tasks", default=None, help="comma-separated tasks to serve (default: all)")
    sv_p.add_argument("--max-batch", type=int, default=64, help="images per forward batch (default 64)")
    sv_p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests "
                      f"after its first (default 5, at most {MAX_WAIT_MS})")
    sv_p.add_argument("--read-timeout-s", type=float, default=30.0, help="how long a request's body may take to "
                      f"arrive before a 408 (default 30, at most {MAX_READ_S})")
    sv_p.set_defaults(func=_cmd_serve)
    sub.add_parser("tasks", help="list registered tasks").set_defaults(func=_cmd_tasks)
    sub.add_parser("presets", help="list presets").set_defaults(func=_cmd_presets)
    return parser


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error on its end); if so, standard
    output is pointed at /dev/null, or Python would report the broken pipe again when it flushes at exit."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):
        return False
    os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s")
    # set on every call: progress follows munet's level (reporting/progress.py), which -q raises above warnings
    logging.getLogger("munet").setLevel(logging.DEBUG if args.verbose else logging.ERROR if args.quiet
                                        else logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone before the last lines is met below, not at exit
        return code
    except MunetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError as err:
        if _reader_gone():  # `munet status RUN | head`: stop quietly, as Unix tools do
            return 141  # 128 + SIGPIPE, a shell's status for a command whose reader went away
        print(f"error: {err.strerror or err}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's doing (disk full, permissions), not a bug: the store layer keeps it whole
        where = f": {err.filename}" if err.filename else ""
        where += f" -> {err.filename2}" if err.filename2 else ""  # a rename: either path may be the one at fault
        print(f"error: {err.strerror or err}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(args), file=sys.stderr)
        return 130


def _interrupted(args: argparse.Namespace) -> str:
    """What Ctrl-C left behind: the commands that train saved their run up to the last finished generation; the
    others only read it."""
    saved = "interrupted: the run is saved up to its last finished generation; continue it with "
    if args.command == "run" and not args.dry_run:
        out = getattr(args, "out", None)
        if out is None or not (Path(out) / DB_NAME).exists():  # stopped while setting up, before the store existed
            where = f" in {out}" if out else ""
            return f"interrupted before the run was created{where}: nothing was saved; start it with the same command"
        return saved + f"the same command or `munet resume {shlex.quote(str(out))}`"
    if args.command in ("resume", "add-task"):  # add-task again would find the run unfinished: resume finishes it
        return saved + f"`munet resume {shlex.quote(args.run_dir)}`"
    run_dir = getattr(args, "run_dir", None)
    return f"interrupted; {run_dir} is unchanged (this command only reads it)" if run_dir else "interrupted"


if __name__ == "__main__":
    sys.exit(main())

"""The ``munet`` command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from typing import Any

from munet.config import RunConfig, load_config_file
from munet.configs import PRESETS, describe, get_preset
from munet.errors import MunetError


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
    """The run configuration from preset, config file and command-line overrides, validated."""
    base = get_preset(args.preset or "default")
    return base.replace(**_overrides(args)).validate()


def _cmd_run(args: argparse.Namespace) -> int:
    from munet.runner import run

    run(build_config(args))
    return 0


def _cmd_add_task(args: argparse.Namespace) -> int:
    from munet.runner import add_tasks

    add_tasks(args.run_dir, args.tasks, _overrides(args))
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
    sub = parser.add_subparsers(dest="command")
    run_p = sub.add_parser("run", help="evolve a new system (no arguments: the offline default)")
    _add_config_args(run_p)
    run_p.set_defaults(func=_cmd_run)
    add_p = sub.add_parser("add-task", help="introduce new tasks into an existing run (one task iteration each)")
    add_p.add_argument("run_dir", help="run directory of an earlier `munet run`")
    add_p.add_argument("tasks", nargs="+", help="task specs to add")
    _add_config_args(add_p)
    add_p.set_defaults(func=_cmd_add_task)
    sub.add_parser("tasks", help="list registered tasks").set_defaults(func=_cmd_tasks)
    sub.add_parser("presets", help="list presets").set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except MunetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the state saved after the last finished task iteration is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

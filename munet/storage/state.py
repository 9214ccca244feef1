"""Saving and loading a system's state: retained paths, locks and component weights (safetensors).

Layout of a run directory::

    config.json            the run configuration
    state.json             paths, components (name, origin, locks, shape), counters, root identity
    components.safetensors every non-root component's tensors, keyed "<component id>/<tensor name>"
    paths.jsonl            one record per path ever sampled (metrics, mutations, hparams, outcome)

Root components are not stored: they are rebuilt from the root spec, whose file hash must match. Files are
written to a temporary name and renamed, so a crash never leaves a half-written state.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path as FsPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from munet.errors import MunetError, WeightsError
from munet.evolution.system import ScoreConfig, System
from munet.model.components import (
    NOT_TRAINABLE,
    Component,
    ResidualAdapter,
    StandardisedHead,
    TokenParam,
    patch_embedding,
)
from munet.model.path import Path
from munet.model.root import Root

STATE_VERSION = 1


def atomic_write(path: FsPath, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(system: System, out: FsPath, extra: dict[str, Any]) -> None:
    """Writes ``state.json`` and ``components.safetensors`` for the retained population."""
    comps = system.components()
    tensors = {f"{cid}/{k}": v.detach().cpu().contiguous()
               for cid, c in comps.items() if NOT_TRAINABLE not in c.locks
               for k, v in c.module.state_dict().items()}
    tmp = out / "components.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, out / "components.safetensors")
    state = {
        "version": STATE_VERSION,
        "root": {"name": system.root.name, "source": system.root.source, "sha256": system.root.sha256,
                 "depth": system.root.depth},
        "next_path_id": system.next_path_id,
        "next_component_id": system.next_component_id,
        "root_posembeds": {str(g): c.id for g, c in system.posembed_cache.items()},
        "num_classes": system.num_classes,
        "components": [{"id": c.id, "name": c.name, "origin": c.origin, "locks": sorted(c.locks),
                        "shape": _shape_args(c)} for c in comps.values()],
        "paths": [path_record(p) for p in system.retained_paths()],
        **extra,
    }
    atomic_write(out / "state.json", json.dumps(state, indent=1, default=_jsonable))


def _shape_args(c: Component) -> dict[str, int]:
    if c.name.startswith("adapter_"):
        return {"adapter_dim": c.module.down.out_features}
    if c.name == "head":
        return {"num_classes": c.module.linear.out_features}
    if c.name == "posembed":
        return {"tokens": c.module.value.shape[1]}
    return {}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    return str(value)


def path_record(p: Path) -> dict[str, Any]:
    return {"id": p.id, "task": p.task, "parent": p.parent.id if p.parent else None, "hparams": p.hparams,
            "metrics": p.metrics, "components": {n: c.id for n, c in p.components.items()}}


def read_state(run_dir: FsPath) -> dict[str, Any]:
    """Reads ``state.json`` with a clear error when it is missing, corrupt or from another version."""
    path = run_dir / "state.json"
    if not path.exists():
        raise MunetError(f"{run_dir} holds no munet state (no state.json): is it a run directory?")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MunetError(f"{path} is corrupt: {err}") from err
    if state.get("version") != STATE_VERSION:
        raise MunetError(f"{path} was written by an incompatible munet state version {state.get('version')}")
    return state


def load_state(state: dict[str, Any], run_dir: FsPath, root: Root, image_size: int, score: ScoreConfig,
               extra_hparams: dict[str, Any]) -> System:
    """Rebuilds the system saved in ``run_dir`` on top of ``root`` (which must be the same root)."""
    if root.sha256 != state["root"]["sha256"] or root.depth != state["root"]["depth"]:
        raise WeightsError(f"the run in {run_dir} was made with root {state['root']['name']} "
                           f"(sha256 {state['root']['sha256']}, depth {state['root']['depth']}); "
                           f"the configured root differs (sha256 {root.sha256}, depth {root.depth})")
    try:
        tensors = load_file(str(run_dir / "components.safetensors"))
    except (OSError, SafetensorError) as err:
        raise WeightsError(f"cannot read {run_dir / 'components.safetensors'}: {err}") from err
    system = System(root, image_size, score, extra_hparams)
    for grid, cid in state["root_posembeds"].items():
        comp = system.root_posembed(int(grid) * root.patch_size)
        comp.id = cid
    by_id = {c.id: c for c in system.root_path.components.values()}
    by_id.update({c.id: c for c in system.posembed_cache.values()})
    for rec in state["components"]:
        if rec["id"] in by_id:
            continue
        module = _empty_module(rec["name"], rec["shape"], system)
        own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == str(rec["id"])}
        try:
            module.load_state_dict(own)
        except RuntimeError as err:
            raise WeightsError(f"component {rec['name']}#{rec['id']} does not match its stored tensors: {err}") from err
        module.requires_grad_(False)
        by_id[rec["id"]] = Component(rec["id"], rec["name"], module, set(rec["locks"]), rec["origin"])
    for rec in state["components"]:
        by_id[rec["id"]].locks = set(rec["locks"])
    paths: dict[int, Path] = {system.root_path.id: system.root_path}
    for rec in sorted(state["paths"], key=lambda r: r["id"]):
        comps = {n: by_id[cid] for n, cid in rec["components"].items()}
        paths[rec["id"]] = Path(rec["id"], rec["task"], comps, rec["hparams"], None, rec["metrics"])
    for rec in state["paths"]:
        paths[rec["id"]].parent = paths.get(rec["parent"]) if rec["parent"] is not None else None
    for task, n in state["num_classes"].items():
        system.add_task(task, n)
    for rec in state["paths"]:
        system.paths[rec["task"]].append(paths[rec["id"]])
    system.next_path_id = state["next_path_id"]
    system.next_component_id = state["next_component_id"]
    return system


def _empty_module(name: str, shape: dict[str, int], system: System) -> torch.nn.Module:
    """A module of the right architecture for a stored component, to load its tensors into."""
    m, dim = system.root.model, system.root.embed_dim
    if name == "embedding":
        return patch_embedding(m.patch_embed)
    if name == "cls":
        return TokenParam(m.cls_token)
    if name == "posembed":
        return TokenParam(torch.zeros(1, shape["tokens"], dim))
    if name.startswith("block_"):
        return copy.deepcopy(m.blocks[int(name.split("_")[1])])
    if name == "norm":
        return copy.deepcopy(m.norm)
    if name.startswith("adapter_"):
        return ResidualAdapter(dim, shape["adapter_dim"])
    if name == "head":
        return StandardisedHead(dim, shape["num_classes"])
    raise WeightsError(f"unknown component name {name!r} in stored state")

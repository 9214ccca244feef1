"""The root as a run stores it: its identity and architecture written beside the root components' blobs, the
root rebuilt from them without its source, and the check that a root loaded from its source is the run's."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from munet.errors import StoreError, WeightsError
from munet.evolution.system import System
from munet.model.root import Root
from munet.model.vitarch import build_vit, check_rebuild, describe_vit
from munet.storage.files import blob_bytes
from munet.storage.store import Store


def root_record(root: Root, system: System) -> dict[str, Any]:
    """The root's identity and architecture; its weights are the root components' blobs.

    Raises:
        WeightsError: the root has NaN or infinite weights (every child would diverge and be discarded).
    """
    for name, tensor in root.model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise WeightsError(f"the root {root.description} [{root.source}] has NaN or infinite weights in {name}: "
                               "nothing can be trained on it; check or replace its weights file")
    return {"name": root.name, "description": root.description, "source": root.source, "sha256": root.sha256,
            "mean": list(root.mean), "std": list(root.std), "pretrained": root.pretrained,
            "full_depth": root.full_depth, "depth": root.depth, "patch_size": root.patch_size,
            "posembed_resize": root.posembed_resize,
            "arch": check_rebuild(root.model, describe_vit(root.model)), "path_id": system.root_path.id,
            "components": {n: c.id for n, c in system.root_components().items()},
            "hparams": system.root_path.hparams}


def root_from_store(store: Store) -> Root:
    """The root rebuilt from its stored description and blobs, without its original source.

    Raises:
        StoreError: the root cannot be rebuilt from its description, or its record is damaged.
    """
    try:
        return _root_from_record(store, store.root_record())
    except (KeyError, TypeError, ValueError, RuntimeError) as err:  # a record that reads as JSON yet is not the root's
        raise StoreError(f"the root record of {store.dir} is damaged ({type(err).__name__}: {err}); run `munet check "
                         f"{store.dir}`") from err


def _root_from_record(store: Store, rec: dict[str, Any]) -> Root:
    if rec["arch"] is None:
        raise StoreError(f"the root of {store.dir} ({rec['description']}) has an architecture munet cannot rebuild "
                         "from its description, so this operation needs it from its source")
    model = build_vit(rec["arch"], dynamic_img_size=rec["arch"]["dynamic_img_size"])
    parts = {n: _component_tensors(store, cid, n) for n, cid in rec["components"].items()}
    with torch.no_grad():
        model.patch_embed.load_state_dict(parts["embedding"])
        model.cls_token.copy_(parts["cls"]["value"])
        model.pos_embed.copy_(parts["posembed"]["value"])
        for i, block in enumerate(model.blocks):
            block.load_state_dict(parts[f"block_{i}"])
        model.norm.load_state_dict(parts["norm"])
    return Root(model=model, name=rec["name"], description=rec["description"], source=rec["source"],
                sha256=rec["sha256"], mean=tuple(rec["mean"]), std=tuple(rec["std"]), pretrained=rec["pretrained"],
                full_depth=rec["full_depth"], posembed_resize=stored_posembed_resize(store))


def stored_posembed_resize(store: Store) -> str:
    """How the run's root resizes its position embedding: as recorded; bicubic for runs made before the choice
    existed (every root resized bicubically then)."""
    return store.root_record().get("posembed_resize", "bicubic")


def verify_root(store: Store, root: Root, system: System) -> None:
    """Raises WeightsError unless ``root`` is the root the run was made with (same file and same weights)."""
    rec = store.root_record()
    if root.sha256 != rec["sha256"] or root.depth != rec["depth"]:
        raise WeightsError(f"the run in {store.dir} was made with root {rec['name']} (sha256 {rec['sha256']}, "
                           f"depth {rec['depth']}) from {rec['source']}; the configured root differs (sha256 "
                           f"{root.sha256}, depth {root.depth}, from {root.source}): put back the weights the run was "
                           "made with, or start a new run in another --out directory")
    blobs = {r.id: r.blob for r in store.components()}
    for name, comp in system.root_components().items():
        digest = blobs.get(rec["components"].get(name))
        if digest is None or digest != _digest(comp.module.state_dict()):
            raise WeightsError(f"the root's {name} differs from the one the run in {store.dir} was made with "
                               f"({rec['description']}, from {rec['source']}): put back the weights the run was made "
                               "with, or start a new run in another --out directory")
        # the root's blobs are never read when it comes from its source, yet `predict` and `export` read them
        problem = store.blobs.problem(digest, f"the root's {name}")
        if problem:
            raise StoreError(f"{problem}; run `munet check {store.dir}`")


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    return hashlib.sha256(blob_bytes(tensors)).hexdigest()


def _component_tensors(store: Store, cid: int, name: str) -> dict[str, torch.Tensor]:
    digest = store.component_blob(cid)
    if digest is None:
        raise StoreError(f"component {name}#{cid} has no record in {store.dir}; run `munet check {store.dir}`")
    return store.blobs.read(digest, f"component {name}#{cid}")

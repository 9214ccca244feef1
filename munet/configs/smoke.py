"""Smoke test: the real root and two small real tasks, a tiny budget; finishes in well under a minute.

Checks that the whole pipeline (root conversion, data, evolution, training, test evaluation, saving, report)
works on this machine. Accuracy is not the point.

Command: ``munet run --preset smoke``.
"""

from munet.config import RunConfig


def get_config() -> RunConfig:
    return RunConfig(tasks=["uci_digits", "faces"], depth=2, image_size=28, children_per_task=4, generation_size=2,
                     steps_between_validations=5, validations=2, max_val_examples=200, out="runs/smoke")

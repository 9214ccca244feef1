"""The paper's 8-task Multitask Character Classification benchmark (spec §6.1), through online data sets.

muNet on ViT-Ti/16 (AugReg, ImageNet-21k) truncated to 3 layers at 32 px, 2 rounds x 64 children per task in
generations of 8, batch 512, 5 validations of up to 100 steps (spec §4.1). Needs internet (timm hub weights,
torchvision downloads) and a GPU for a reasonable run time. EMNIST, KMNIST, MNIST and Omniglot come from
torchvision; CMATERdb (bangla, devanagari, telugu) is only in TFDS, so export it once to ``.npz`` files
(arrays x_train, y_train, x_test, y_test) under ``data/cmaterdb/``. Expected: in the range of the paper's
leaderboard (e.g. MNIST about 0.97 test accuracy); not measured here (no internet on our machines).

Command: ``munet run --preset chars``.
"""

from munet.config import RunConfig


def get_config() -> RunConfig:
    tasks = ["torchvision:EMNIST:digits", "torchvision:EMNIST:letters", "torchvision:KMNIST", "torchvision:MNIST",
             "torchvision:Omniglot", "npz:data/cmaterdb/bangla.npz", "npz:data/cmaterdb/devanagari.npz",
             "npz:data/cmaterdb/telugu.npz"]
    # clone_prob = μ: the paper clones every component with the same probability
    return RunConfig(tasks=tasks, root="timm:vit_tiny_patch16_224.augreg_in21k", depth=3, image_size=32,
                     max_image_size=384, children_per_task=64, generation_size=8, rounds=2, batch_size=512,
                     steps_between_validations=100, validations=5, max_val_examples=5120, out="runs/chars",
                     clone_prob=0.1)

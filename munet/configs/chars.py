"""The paper's 8-task Multitask Character Classification benchmark (spec §6.1) as muNet ran it, through online data.

Reproduces muNet on the spec's root, the AugReg ViT-Ti/16 (ImageNet-21k, aug light1, wd 0.1, sd 0) truncated to 3
layers, at 32 px (evolvable up to 384), with the paper's loop (``PAPER_MUNET``): 2 rounds x 64 children per task in
generations of 8, every other task's path and the root probed in the first children's slots, batch 512, 5
validations of up to 100 steps on up to 5,120 validation images, lr 0.01, crops to >= 5 % of the area and flips, a
plain zero-initialised head, μ = 0.1 for every decision, pure-quality score. Expected: in the range of the spec's
example leaderboard (test accuracy emnist/digits 0.971, mnist 0.968, omniglot 0.606, cmaterdb/bangla 0.855); not
measured here (no internet, no accelerator on our machines).

Needs: the root file (timm's ``vit_tiny_patch16_224.augreg_in21k`` is another checkpoint: aug none, wd 0.03), the
torchvision downloads (EMNIST, KMNIST, MNIST, Omniglot; internet on first use) and CMATERdb, which is only in TFDS:
export it once to ``.npz`` files (arrays x_train, y_train, x_test, y_test) under ``data/cmaterdb/``. A GPU is
advised. Remaining deviations: validation is a stratified 5 % of train (the spec: ``train[:5%]``); Omniglot's
background set is split 70/10/20 (the spec: train / small1 / small2); a generation's 8 children train in lock-step
on one device (same results as one per device).

Command (from the folder holding ``data/``)::

    mkdir -p data/roots && curl -o data/roots/Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz \\
        https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz
    munet run --preset chars --dry-run   # the plan
    munet run --preset chars

Offline (no internet), docs/commands.md gives a scaled-down run on the offline character tasks and root (8-10
minutes on one thread; measured in benchmarks/README.md).
"""

from munet.config import RunConfig
from munet.configs import PAPER_MUNET

ROOT_FILE = "Ti_16-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0.npz"  # spec §1.1's Characters query


def get_config() -> RunConfig:
    tasks = ["torchvision:EMNIST:digits", "torchvision:EMNIST:letters", "torchvision:KMNIST", "torchvision:MNIST",
             "torchvision:Omniglot", "npz:data/cmaterdb/bangla.npz", "npz:data/cmaterdb/devanagari.npz",
             "npz:data/cmaterdb/telugu.npz"]
    return RunConfig(tasks=tasks, root=f"file:data/roots/{ROOT_FILE}", depth=3, image_size=32, batch_size=512,
                     steps_between_validations=100, validations=5, max_val_examples=5120, out="runs/chars",
                     **PAPER_MUNET)

"""The paper's headline benchmark: the 10-task Visual Domain Decathlon (spec §6.1) as muNet ran it, from user files.

Reproduces muNet on the spec's root, the AugReg ViT-B/16 (ImageNet-21k, aug medium1, wd 0.1, sd 0: exactly the
checkpoint timm names ``vit_base_patch16_224.augreg_in21k``), all 12 layers, at 80 px (evolvable up to 384), with
the paper's loop (``PAPER_MUNET``): 2 rounds x 64 children per task in generations of 8, every other task's path and
the root probed in the first children's slots, batch 256, 30 validations of up to 200 steps on up to 2,560
validation images, lr 0.01, crops to >= 5 % of the area and flips, a plain zero-initialised head, μ = 0.1 for every
decision, pure-quality score. The paper reports +2.39 % average accuracy with 47 % fewer parameters per task than
fine-tuning (per-task numbers UNVERIFIED); not measured here (no internet, no accelerator on our machines).

Needs: internet for the root weights (or ``--root file:PATH.npz`` with the AugReg B/16 file), the VDD images as image
folders ``data/vdd/<task>/{train,val,test}/<class>/`` (val = validation[:50%], test = validation[50%:]), and
accelerators (1,280 children of up to 6,000 steps of 256 images). Remaining deviations: a generation's 8 children
train in lock-step on one device (same results as one per device); the score's reference count ``P`` uses the
position embedding at 80 px, not 32 px (no effect at s = 1).

Command (from the folder holding ``data/``)::

    munet run --preset vdd --dry-run   # the plan: tasks, children, steps, images, memory
    munet run --preset vdd
"""

from munet.config import RunConfig
from munet.configs import PAPER_MUNET

VDD_TASKS = ["imagenet12", "svhn", "cifar100", "gtsrb", "daimlerpedcls", "omniglot", "ucf101", "aircraft", "dtd",
             "vgg-flowers"]


def get_config() -> RunConfig:
    return RunConfig(tasks=[f"folder:data/vdd/{t}" for t in VDD_TASKS], root="timm:vit_base_patch16_224.augreg_in21k",
                     depth=12, image_size=80, batch_size=256, steps_between_validations=200, validations=30,
                     max_val_examples=2560, out="runs/vdd", **PAPER_MUNET)

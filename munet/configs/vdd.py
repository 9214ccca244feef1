"""The paper's headline benchmark: the 10-task Visual Domain Decathlon (spec §6.1), from user-provided files.

muNet on ViT-B/16 (AugReg, ImageNet-21k) at 80 px, 2 rounds x 64 children per task in generations of 8,
batch 256, 30 validations of up to 200 steps (spec §4.1). The paper reports +2.39% average accuracy with 47%
fewer parameters per task than fine-tuning (UNVERIFIED per-task numbers). Needs internet for the root weights
(or ``--root file:PATH.npz`` with the AugReg B/16 file) and the VDD images as image folders
``data/vdd/<task>/{train,val,test}/<class>/`` (val = validation[:50%], test = validation[50%:]). Sized for
accelerators; not measured here.

Command: ``munet run --preset vdd``.
"""

from munet.config import RunConfig

VDD_TASKS = ["imagenet12", "svhn", "cifar100", "gtsrb", "daimlerpedcls", "omniglot", "ucf101", "aircraft", "dtd",
             "vgg-flowers"]


def get_config() -> RunConfig:
    # clone_prob = μ: the paper clones every component with the same probability
    return RunConfig(tasks=[f"folder:data/vdd/{t}" for t in VDD_TASKS], root="timm:vit_base_patch16_224.augreg_in21k",
                     depth=12, image_size=80, max_image_size=384, children_per_task=64, generation_size=8, rounds=2,
                     batch_size=256, steps_between_validations=200, validations=30, max_val_examples=2560,
                     out="runs/vdd", clone_prob=0.1)

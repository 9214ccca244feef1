"""Is bfloat16 autocast worth it for training on this CPU? One SGD step (forward, backward, update) of the default
root's architecture (ViT-S/14, its first 6 blocks, random weights: speed does not depend on them), float32 against
bfloat16 autocast, timed interleaved in one process (one thread), so both see the same machine.

Expected on the development machine (a Xeon with AMX, 2026-12-05; the best of two interleaved rounds): 1.14x at
42 px with 64 images (the default's size and batch; an earlier single round read 0.97x), 1.20x with 128 images,
1.51x at 56 px: too little to fit the default run into 15 minutes, and a change to every result, so munet computes in
float32 on CPUs (docs/commands.md, "Default run").

    python benchmarks/speed_autocast.py
"""

from __future__ import annotations

import time

import timm
import torch

SHAPES = ((42, 64), (42, 128), (56, 64))  # (image size, batch): the default, a larger batch, the largest size
REPEATS = 15


def step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 bf16: bool) -> float:
    """Mean seconds of one training step, after three warm-up steps."""
    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(REPEATS):
        step()
    return (time.perf_counter() - start) / REPEATS


def main() -> None:
    torch.set_num_threads(1)
    model = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=42, num_classes=10,
                              dynamic_img_size=True)
    model.blocks = model.blocks[:6]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for size, batch in SHAPES:
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        fp32, bf16 = [], []
        for _ in range(2):  # interleaved: a drift of the machine reaches both
            fp32.append(step_seconds(model, opt, x, y, bf16=False))
            bf16.append(step_seconds(model, opt, x, y, bf16=True))
        print(f"{size} px, {batch} images: float32 {min(fp32) * 1e3:.0f} ms, bfloat16 autocast {min(bf16) * 1e3:.0f} "
              f"ms per step: {min(fp32) / min(bf16):.2f}x")


if __name__ == "__main__":
    main()

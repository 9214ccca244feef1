"""munet: evolve a pretrained Vision Transformer into one multitask system (muNet, Gesmundo & Dean 2022).

``munet.load(RUN)`` reads a run's multitask system (``.tasks``, ``.predict``, ``.export``);
``munet.load_exported(DIR)`` loads an exported model as a plain ``torch.nn.Module``; ``munet.load_multitask(DIR)``
the one model of every task that ``munet export RUN --task all`` writes.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load", "load_exported", "load_multitask"]


def __getattr__(name: str) -> Any:
    # imported on first use: `import munet` (and the CLI's start) stays free of torch
    if name == "load":
        from munet.api import load

        return load
    if name == "load_exported":
        from munet.export import load_exported

        return load_exported
    if name == "load_multitask":
        from munet.multitask_export import load_multitask

        return load_multitask
    raise AttributeError(f"module 'munet' has no attribute {name!r}")

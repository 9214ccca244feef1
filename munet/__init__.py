"""munet: evolve a pretrained Vision Transformer into one multitask system (muNet, Gesmundo & Dean 2022)."""

__version__ = "0.1.0"

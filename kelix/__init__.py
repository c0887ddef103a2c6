"""Kelix: a PyTorch Lightning experiment kit for a fully discrete unified multimodal model.

Importing ``kelix`` is cheap on purpose: heavy libraries (torch, lightning, transformers) load only
when a component that needs them is imported, so ``kelix --help`` answers at once.
"""

__version__ = "0.1.0"

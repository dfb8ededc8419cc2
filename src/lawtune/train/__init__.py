"""Training: SFT today (``sft.py``), each method one module on a Trainer; batches, loss, kernels, callbacks
and the Trainer subclass beside it, and what the methods share (data split, run opening, curves) in ``common.py``."""

from .sft import SFTResult, SFTRun, fit, setup, train

__all__ = ["SFTResult", "SFTRun", "fit", "setup", "train"]

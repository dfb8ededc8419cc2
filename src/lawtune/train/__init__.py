"""Training: SFT today (``sft.py``), each method one module on a Trainer; batches, loss, kernels, callbacks
and the Trainer subclass beside it."""

from .sft import SFTResult, SFTRun, fit, setup, train

__all__ = ["SFTResult", "SFTRun", "fit", "setup", "train"]

"""The loss of ``train.sparse_logits``: cross-entropy at the label positions only.

Only the answer tokens carry loss, so ~97% of the 151,936-wide logits the plain path computes would be
thrown away; the LM head runs where ``collate.SparseLogitsCollator`` says instead. Same loss and gradients
as transformers' causal-LM loss (tests/test_fast.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_logits_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Token-summed cross-entropy over the kept positions, divided by the label count of the whole step.

    The same normalisation as transformers' causal-LM loss (float32 logits, sum over the gradient
    accumulation window's labels), so the loss and gradients equal those of the plain path.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels[:, 1:].to(logits.device)  # SparseLogitsCollator's leading ignored column
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                           reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device).clamp(min=1)
    else:
        num_items_in_batch = max(int(num_items_in_batch), 1)
    return loss / num_items_in_batch

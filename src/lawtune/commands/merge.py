"""`lawtune merge`: fold a LoRA adapter into its base model (a plain transformers directory)."""

from __future__ import annotations

from ..config import MergeRun
from ..merge import merge_adapter


def run_merge(cfg: MergeRun, overwrite: bool = False) -> int:
    info = merge_adapter(cfg, overwrite=overwrite)
    print(f"merged {cfg.adapter.path} into {cfg.model.path} ({info['dtype']}, {info['tensors']} tensors, no LoRA keys, "
          f"reloaded and checked) -> {info['output']}")
    return 0

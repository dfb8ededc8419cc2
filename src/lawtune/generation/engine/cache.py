"""The KV cache: ``slots`` rows of ``max_len`` columns, one sequence a row, allocated once.

A static cache is what lets a GPU replay each decoding step from one CUDA graph: every step writes and reads the same
tensors. A row's column is a position of its sequence (prompt and generation); each row writes its own next column
(``write_at``), so rows of any length decode side by side in one step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotCache(Cache):
    """Keys and values of ``slots`` sequences, one row each, ``max_len`` columns; a column is a position.

    While ``prefill_rows`` is set, a forward writes its (right-padded) token chunks into those rows from column
    ``prefill_at`` (per row; 0 for a prompt) and attends the rows' first ``prefill_columns`` columns (a prompt's
    prefill: its own chunk only). Otherwise (decoding, one new token a row) each row's key and value go to that row's
    own column ``write_at`` and the first ``columns`` columns of the rows are attended, masked by the engine's
    visibility mask."""

    def __init__(self, layers: int, slots: int, max_len: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__(layers=[])
        shape = (slots, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.rows = torch.arange(slots, device=device)
        self.write_at = torch.zeros(slots, dtype=torch.long, device=device)
        self.prefill_rows: torch.Tensor | None = None
        self.prefill_at: torch.Tensor | None = None  # (rows, 1): the column of each row's first chunk token
        self.prefill_columns = 0  # 0: a chunk attends itself only
        self.active = slots  # decoding runs the rows [0, active)
        self.columns = max_len  # and attends their columns [0, columns)
        self.max_len = max_len

    @property
    def tokens(self) -> int:
        """Key and value entries the cache holds (all rows, all columns)."""
        return len(self.rows) * self.max_len

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_rows is not None:
            width = key_states.shape[2]
            if self.prefill_at is None:
                keys[self.prefill_rows, :, :width] = key_states
                values[self.prefill_rows, :, :width] = value_states
                return key_states, value_states
            columns = self.prefill_at + torch.arange(width, device=self.prefill_at.device)  # (rows, width)
            rows = self.prefill_rows[:, None]
            keys[rows, :, columns] = key_states.transpose(1, 2)
            values[rows, :, columns] = value_states.transpose(1, 2)
            c = self.prefill_columns
            return keys[self.prefill_rows, :, :c], values[self.prefill_rows, :, :c]
        a = self.active
        keys[self.rows[:a], :, self.write_at[:a]] = key_states[:, :, 0]
        values[self.rows[:a], :, self.write_at[:a]] = value_states[:, :, 0]
        return keys[:a, :, : self.columns], values[:a, :, : self.columns]

    def copy_row(self, src: int, dst: list[int], width: int) -> None:
        """Row ``src``'s first ``width`` columns into rows ``dst`` (samples sharing one prompt)."""
        index = torch.tensor(dst, device=self.rows.device)
        for tensor in (*self.keys, *self.values):
            tensor[index, :, :width] = tensor[src, :, :width]

    def release(self) -> None:
        """Drop the tensors (the engine is closed)."""
        self.keys, self.values = [], []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions are always passed explicitly

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def get_mask_sizes(self, *args, **kwargs) -> tuple[int, int]:
        return self.max_len, 0


class LayerSlots(Cache):
    """One layer's keys and values of a ``SlotCache`` for a decoding step run layer by layer: what the compiled layer
    sees holds tensors only (no layer index, no row or column counts), so one compilation serves every layer and every
    width (the rows come from the new keys' shape, the columns from the step's mask)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, write_at: torch.Tensor,
                 mask: torch.Tensor):
        super().__init__(layers=[])
        self.keys, self.values, self.rows, self.write_at, self.mask = keys, values, rows, write_at, mask

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        a, columns = key_states.shape[0], self.mask.shape[-1]
        self.keys[self.rows[:a], :, self.write_at[:a]] = key_states[:, :, 0]
        self.values[self.rows[:a], :, self.write_at[:a]] = value_states[:, :, 0]
        return self.keys[:a, :, :columns], self.values[:a, :, :columns]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

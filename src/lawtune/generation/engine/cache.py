"""The KV cache: ``slots`` rows of ``max_len`` columns, one sequence a row, allocated once.

A static cache is what lets a GPU replay each decoding step from one CUDA graph: every step writes and reads the same
tensors. A row's column is a position of its sequence (prompt and generation); each row writes its own next column
(``write_at``), so rows of any length decode side by side in one step.
"""

from __future__ import annotations

import os

import torch
from transformers.cache_utils import Cache

from ...errors import UsageError


def cache_dtype(weight: torch.Tensor) -> torch.dtype:
    """The cache's dtype for a model whose embedding weight is ``weight`` (a quantised model's cache is bf16)."""
    return weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def token_bytes(config, dtype: torch.dtype) -> int:
    """Bytes one position takes in the cache of a model of ``config``: a key and a value of every layer."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim * dtype.itemsize


def budget_bytes(spec: str, device: torch.device, held: int = 0) -> int | None:
    """The KV cache budget of ``generation.kv_cache`` in bytes: ``"40GiB"``, or ``"70%"`` of the free memory (the
    GPU's; on a CPU the available RAM), counting the ``held`` bytes of the cache it would replace as free. None (no
    cap) where the free memory cannot be read."""
    if spec.endswith("GiB"):
        return int(float(spec[:-3]) * 2**30)
    if device.type == "cuda":
        # torch's allocator keeps freed blocks (a training step's activations) reserved: free for the cache too
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, ValueError, OSError):  # not every system names these (macOS has no SC_AVPHYS_PAGES)
            return None
    return int((free + held) * float(spec[:-1]) / 100)


def rows_within(budget: int | None, max_len: int, per_token: int, least: int = 1) -> int:
    """Rows of ``max_len`` positions the budget holds (no cap for None); an error where it holds fewer than
    ``least`` (the samples of one request share a prefill, so they run at once)."""
    if budget is None:
        return 1 << 62
    fits = budget // (max_len * per_token)
    if fits < least:
        raise UsageError(f"generation.kv_cache: {budget / 2**30:.2f} GiB holds {fits} rows of {max_len} tokens "
                         f"({per_token * max_len / 2**20:.0f} MiB a row), {least} needed; give more (e.g. "
                         f"generation.kv_cache=90%) or a shorter token budget")
    return fits


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

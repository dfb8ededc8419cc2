"""One ``torch.compile`` of a function a process, shared by every engine (the fused decoding step's parts).

Dynamic shapes: one compilation serves every width of rows and columns (a width of one row is specialised once
more by torch), so an engine's first step of a new width waits for no compilation after the first.
"""

from __future__ import annotations

from typing import Any

import torch

_compiled: dict[str, Any] = {}


def compiled(name: str, fn):
    """``fn`` compiled once a process under ``name``. Inductor's Python wrapper, whatever the process-wide setting:
    a training command that compiles its layers turns the C++ wrapper on for the whole process (compat.py), and the
    engine's step was measured, and is recorded into CUDA graphs, with the Python one."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, options={"cpp_wrapper": False})
    return _compiled[name]

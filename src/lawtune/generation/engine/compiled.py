"""One ``torch.compile`` of a function a process, shared by every engine (the fused decoding step's parts).

Dynamic shapes: one compilation serves every width of rows and columns (a width of one row is specialised once
more by torch), so an engine's first step of a new width waits for no compilation after the first.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger("lawtune")
_compiled: dict[str, Any] = {}
_failed: dict[str, str] = {}


def compiled(name: str, fn):
    """``fn`` compiled once a process under ``name``. Inductor's Python wrapper, whatever the process-wide setting:
    a training command that compiles its layers turns the C++ wrapper on for the whole process (compat.py), and the
    engine's step was measured, and is recorded into CUDA graphs, with the Python one."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True, options={"cpp_wrapper": False})
    return _compiled[name]


def compiled_or_eager(name: str, fn):
    """``compiled(name, fn)`` where it compiles, else ``fn`` itself from its first failure on (logged once): for a
    part of the step whose compilation is a speed-up only (the sampler's), so that a compiler that cannot serve it
    leaves the rest of the step compiled (a failure inside the step turns the whole step eager, see
    ``ModelRunner.first_run``)."""
    def call(*args):
        if name not in _failed:
            try:
                return compiled(name, fn)(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of the compiler
                _failed[name] = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                log.warning("generation engine: compiling %s failed (%s); it runs uncompiled", name, _failed[name])
        return fn(*args)
    return call

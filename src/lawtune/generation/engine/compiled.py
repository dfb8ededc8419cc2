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


def failure_reason(exc: BaseException) -> str:
    """The last line of an exception's message (a compiler's is many lines), for a one-line log."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]


def first_working(name: str, fast, slow):
    """``fast(*args)`` until it raises once, then ``slow(*args)`` from then on in the process (logged once): for a
    speed-up of the step that a compiler or a Triton build may not serve (the sampler's parts and kernel), so that
    its failure costs that speed-up only; a failure inside the step turns the whole step eager, layers too (see
    ``ModelRunner.first_run``)."""
    def call(*args):
        if name not in _failed:
            try:
                return fast(*args)
            except Exception as exc:  # noqa: BLE001 - any failure of the compiler or the kernel's build
                _failed[name] = failure_reason(exc)
                log.warning("generation engine: %s failed (%s); the plain torch path serves from now on", name,
                            _failed[name])
        return slow(*args)
    return call


def compiled_or_eager(name: str, fn):
    """``compiled(name, fn)`` where it compiles, else ``fn`` itself (``first_working``)."""
    return first_working(f"compiling {name}", lambda *args: compiled(name, fn)(*args), fn)

#!/usr/bin/env python
"""How long one full Python garbage collection stops a `lawtune train` process, with and without gc.freeze.

    python bench/gc_pause.py CONFIG key=value ...     # e.g. the 1.5B config with data.train=20,000 questions

Builds everything `lawtune train` builds before its first step (tokenized data, model with LoRA, Trainer,
optimizer), then times full collections while all of it is tracked, and again after ``gc.freeze()`` (what
``lawtune.train.callbacks.GcPauses`` does when training starts). Prints one JSON line with the median of each.
No compiled graphs exist yet at that point, so a compiled run's pauses are longer (bench/README.md).
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def full_collection_ms(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def main(argv: list[str]) -> int:
    from lawtune.config import load_config
    from lawtune.train import setup

    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    parts = setup(load_config(argv[0], argv[1:]))
    parts.trainer.create_optimizer()
    tracked = len(gc.get_objects())
    unfrozen = full_collection_ms()
    gc.freeze()
    frozen = full_collection_ms()
    gc.unfreeze()
    print(json.dumps({"bench": "gc_pause", "examples": parts.n_train, "tracked_objects": tracked,
                      "full_collection_ms": round(unfrozen, 2), "frozen_full_collection_ms": round(frozen, 4)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

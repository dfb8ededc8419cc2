"""Logging of a lawtune process: lawtune's own messages at INFO on rank 0, the libraries' only when they fail.

Set up once by the command line before a command runs; library modules only log (``logging.getLogger(__name__)``).
"""

from __future__ import annotations

import logging
import os

from .dist import is_main_process


def setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S", level=logging.WARNING)
    # In a distributed job only rank 0 talks; the others report warnings and errors only.
    logging.getLogger("lawtune").setLevel(logging.INFO if is_main_process() else logging.WARNING)
    for noisy in ("bitsandbytes", "transformers", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # weight loading takes a second; its bar would split a one-line error in two

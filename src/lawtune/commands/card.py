"""`lawtune card`: write or refresh the model card (README.md) of a training run's models or of one model folder."""

from __future__ import annotations

from pathlib import Path

from ..card import CARD_FILE, write_card
from ..config import CardRun
from ..errors import UsageError


def model_folders(path: Path) -> list[Path]:
    """The folders a card goes into: a run's final_model/ and best_model/, else the folder itself where it holds a
    model (an adapter or a transformers model)."""
    inside = [path / name for name in ("final_model", "best_model") if (path / name).is_dir()]
    if inside:
        return inside
    if (path / "adapter_config.json").is_file() or (path / "config.json").is_file():
        return [path]
    raise UsageError(f"card.path: {path} holds no model (no final_model/ or best_model/, no adapter_config.json or "
                     f"config.json)")


def run_card(cfg: CardRun) -> int:
    c = cfg.card
    if not c.path:
        raise UsageError("card.path: required (lawtune card RUN_DIR --report report.json ...)")
    path = Path(c.path)
    if not path.is_dir():
        raise UsageError(f"card.path: {path}: no such folder")
    for folder in model_folders(path):
        # a run's folder holds the metrics and curve of the models in it
        written = write_card(folder, c.report, run_dir=path if folder.parent == path else None)
        print(f"model card ({len(c.report)} report{'s' if len(c.report) != 1 else ''}) -> {written}")
    print(f"upload a folder with: hf upload YOUR_ORG/NAME {model_folders(path)[0]} .   (the card is its {CARD_FILE})")
    return 0

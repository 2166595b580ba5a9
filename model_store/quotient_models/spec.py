"""A model directory's description (``model.json``): what serving needs before any weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["MODEL_FILE", "ModelSpec", "discover_models"]

MODEL_FILE = "model.json"


@dataclass(frozen=True)
class ModelSpec:
    """Parsed ``model.json`` plus the model card's figures (``metrics.json``), if present."""

    name: str
    version: str
    description: str
    modality: str  # "image" | "molecule"; names the family by convention (runtime.family_module)
    architecture: str
    group: dict[str, Any]
    default_projection: str
    directory: Path
    raw: dict[str, Any] = field(repr=False)
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @classmethod
    def load(cls, model_dir: str | Path) -> ModelSpec:
        directory = Path(model_dir).resolve()
        path = directory / MODEL_FILE
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no model.json; is this a model directory?") from None
        missing = [
            k for k in ("name", "version", "modality", "architecture", "group") if k not in raw
        ]
        if missing:
            raise ValueError(f"{path}: missing keys {missing}")
        metrics_file = directory / raw.get("metrics", "metrics.json")
        metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else []
        return cls(
            name=raw["name"],
            version=str(raw["version"]),
            description=raw.get("description", ""),
            modality=raw["modality"],
            architecture=raw["architecture"],
            group=raw["group"],
            default_projection=raw.get("default_projection", ""),
            directory=directory,
            raw=raw,
            metrics=metrics,
        )

    def path(self, key: str, *subkeys: str) -> Path:
        """Path of a file named in model.json, e.g. ``spec.path("encoder", "onnx")``."""
        value: Any = self.raw[key]
        for k in subkeys:
            value = value[k]
        return self.directory / str(value)

    @property
    def input_size(self) -> int:
        return int(self.raw.get("input", {}).get("size", 0))

    def model_card(self) -> str:
        card = self.directory / self.raw.get("card", "MODEL_CARD.md")
        return card.read_text() if card.exists() else ""


def discover_models(root: str | Path) -> list[ModelSpec]:
    """Every model directory directly under root (those holding a model.json), by name."""
    specs = [ModelSpec.load(p.parent) for p in sorted(Path(root).glob(f"*/{MODEL_FILE}"))]
    names = [s.name for s in specs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"duplicate model names under {root}: {sorted(dupes)}")
    return sorted(specs, key=lambda s: s.name)

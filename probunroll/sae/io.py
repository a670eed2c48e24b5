"""Save and load SAEs as safetensors weights plus a JSON config."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from probunroll.sae.base import SparseAutoencoder

__all__ = ["load", "save"]

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def save(model: SparseAutoencoder, path: str | Path) -> Path:
    """Write ``model`` to the directory ``path``: ``model.safetensors`` (every parameter and
    buffer, e.g. BatchTopK's threshold, archetypal points) and ``config.json`` (class name
    and constructor arguments). Returns the directory."""
    from safetensors.torch import save_file

    if not isinstance(model, SparseAutoencoder):
        raise ValueError(
            f"model must be a probunroll SparseAutoencoder, got {type(model).__name__}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS))
    meta = {"format": "probunroll.sae", "version": FORMAT_VERSION,
            "type": type(model).__name__, "config": model.config}  # fmt: skip
    (path / CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return path


def load(path: str | Path, device: str | torch.device | None = None) -> SparseAutoencoder:
    """Rebuild a model written by :func:`save`; returned in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"path {str(path)!r} holds no {CONFIG} + {WEIGHTS} pair")
    meta = json.loads((path / CONFIG).read_text())
    cls = SparseAutoencoder.registry.get(meta.get("type", ""))
    if cls is None:
        raise ValueError(f"path {str(path)!r}: unknown SAE type {meta.get('type')!r}")
    model = cls.from_config(meta["config"])
    model.load_state_dict(load_file(str(path / WEIGHTS)))
    if device is not None:
        model = model.to(device)
    return model.eval()

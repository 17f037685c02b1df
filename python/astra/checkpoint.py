"""Fine-tuning checkpoints: one folder per run.

- ``model.safetensors``: the model's weights (the original ``state_dict`` keys);
- ``codebooks.safetensors``: the :class:`~astra.Codebooks` file;
- ``trainer.pt``: optimizer, schedule, random states, step, history;
- ``config.json``: the :class:`~astra.finetune.FinetuneConfig`.

Each file is written to a temporary name and renamed (:func:`astra.cache.write_atomic`),
so an interrupted save leaves the previous file whole. :func:`load_checkpoint` puts a
fine-tuned model back; :func:`save_training_state` / :func:`load_training_state` are the
trainer's side.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from torch import nn

from .cache import write_atomic
from .codebooks import Codebooks

__all__ = ["load_checkpoint", "save_training_state", "load_training_state", "check_resume"]


def save_training_state(out_dir: Path, model: nn.Module, codebooks: Codebooks,
                        config: Dict[str, Any], trainer_state: Dict[str, Any]) -> None:
    """Write the four files of a checkpoint to ``out_dir`` (created if missing)."""
    from safetensors.torch import save_model
    # the patched model's state_dict has the original keys (codebooks are buffers
    # that are not saved); save_model handles tied weights (GPT-2's LM head)
    write_atomic(out_dir / "model.safetensors", lambda tmp: save_model(model, tmp))
    write_atomic(out_dir / "codebooks.safetensors", codebooks.save)
    write_atomic(out_dir / "config.json",
                 lambda tmp: Path(tmp).write_text(json.dumps(config, indent=1)))
    write_atomic(out_dir / "trainer.pt", lambda tmp: torch.save(trainer_state, tmp))


def load_training_state(out_dir: Path, model: nn.Module,
                        num_layers: int) -> Tuple[Codebooks, Dict[str, Any]]:
    """Load the weights of ``out_dir`` into ``model`` (patched or not); return the
    codebooks (checked to have ``num_layers`` layers) and the trainer's state."""
    from safetensors.torch import load_model
    load_model(model, os.fspath(out_dir / "model.safetensors"))
    cb = Codebooks.load(out_dir / "codebooks.safetensors", expect={"num_layers": num_layers})
    return cb, torch.load(out_dir / "trainer.pt", weights_only=False)


def check_resume(out_dir: Union[str, os.PathLike, None], config: Dict[str, Any]) -> None:
    """Raise unless ``out_dir`` holds a checkpoint written with ``config`` (only
    ``steps`` may differ, which stretches the learning-rate schedule)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is None or not (out / "trainer.pt").exists():
        raise FileNotFoundError(f"resume=True but there is no checkpoint in {out_dir}")
    saved = json.loads((out / "config.json").read_text())
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}"
             for k, v in config.items() if k != "steps" and saved.get(k) != v]
    if diffs:
        raise ValueError("resume: the config differs from the checkpoint's: "
                         + "; ".join(diffs))


def _load_weights(model: nn.Module, file: Path):
    """``load_model(strict=False)`` after checking the file: damaged or non-finite
    weights are a ``ValueError`` naming it (the model is untouched then)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model
    try:
        state = load_file(os.fspath(file))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is damaged or not a safetensors file ({e})") from None
    bad = [k for k, t in state.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{file} has non-finite (NaN/inf) weights in {bad[:5]}")
    # safetensors' own loader: it restores tensors saved once for tied weights
    return load_model(model, os.fspath(file), strict=False)


def load_checkpoint(model: nn.Module, path: Union[str, os.PathLike]) -> Codebooks:
    """Load a :func:`astra.finetune.finetune` checkpoint folder into ``model`` (unpatched)
    and return its codebooks (checked against the model): ``astra.patch(model, cb,
    devices=N)`` runs it."""
    path = Path(path)
    for name in ("model.safetensors", "codebooks.safetensors"):
        if not (path / name).exists():
            raise FileNotFoundError(f"{path} is not a finetune checkpoint: no {name}")
    cb = Codebooks.load(path / "codebooks.safetensors", expect=model)
    missing, unexpected = _load_weights(model, path / "model.safetensors")
    if missing or unexpected:
        raise ValueError(f"{path}/model.safetensors does not fit the model: missing "
                         f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    return cb

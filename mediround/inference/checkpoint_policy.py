"""Which checkpoint a run loads and which JCM thresholds it may use with it: the default threshold only
for a checkpoint whose JCM weights were trained, and no numeric threshold on one whose JCM is random."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from mediround.errors import CheckpointError, RecipeError
from mediround.inference import DEFAULT_BETA
from mediround.inference.settings import InferenceConfig
from mediround.model.checkpoint import load_checkpoint
from mediround.model.config import MediRoundConfig


def model_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder of ``path``: the folder itself, or its ``model/`` (a training run's output)."""
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
        return folder / "model"
    return folder


def checkpoint_has_trained_jcm(model_config: Any) -> bool:
    """Whether a model config says its JCM weights were trained (``train-jcm`` saves ``trainable.jcm``)."""
    return bool(model_config.trainable.jcm)


def resolve_betas(config: InferenceConfig, model_config: Any | None = None) -> InferenceConfig:
    """Fill in the default threshold and refuse numeric thresholds on a checkpoint whose JCM is untrained.

    ``model_config`` defaults to the checkpoint's ``config.json`` (read without loading weights); a training
    run's output folder stands for its ``model/`` checkpoint.
    """
    if model_config is None:
        config = replace(config, model=str(model_folder(config.model)))
        path = Path(config.model) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{config.model}: not a MediRound checkpoint (no config.json)")
        try:
            model_config = MediRoundConfig.from_json(path)
        except RecipeError as error:
            raise CheckpointError(f"{path}: {error}") from None
    return replace(config, betas=checked_betas(config.betas, model_config, config.model))


def checked_betas(betas: tuple[float | None, ...], model_config: Any, model: str) -> tuple[float | None, ...]:
    """``betas``, or the default when empty (``DEFAULT_BETA`` with trained JCM weights, else off);
    ``CheckpointError`` for a numeric threshold on the checkpoint ``model`` whose JCM is untrained."""
    trained = checkpoint_has_trained_jcm(model_config)
    if not betas:
        return (DEFAULT_BETA,) if trained else (None,)
    numeric = [b for b in betas if b is not None]
    if numeric and not trained:
        raise CheckpointError(f"{model}: the checkpoint has no trained JCM weights (run `mediround "
                              f"train-jcm`), so --beta {numeric[0]:g} would use random MLPs; use --beta off")
    return betas


def load_model(config: InferenceConfig) -> Any:
    """The checkpoint of ``config.model`` on ``config.device``, in eval mode."""
    return load_checkpoint(config.model, device=config.device, allow_partial=config.allow_partial_load).eval()

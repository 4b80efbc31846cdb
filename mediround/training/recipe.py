"""Training recipes: a YAML file plus dotted ``key=value`` overrides, checked against dataclasses.

Everything about a run is in the recipe: the model (a preset from ``mediround.model.config`` plus
any ``MediRoundConfig`` field), the data files, the output folder and every hyperparameter. A recipe
is validated completely before any process is launched; every problem is ONE ``RecipeError`` line
naming the file and the dotted key (with the closest known key for a typo).

Relative paths in a recipe are resolved against the working directory, as command-line paths are.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import shutil
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mediround.errors import RecipeError
from mediround.model.config import MediRoundConfig, preset

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
RUN_FILE = "run.json"


@dataclass
class DataSection:
    """Dialogue files (JSONL or MR-MedSeg JSON) and the folder their image/mask paths are relative to."""

    train: str = ""
    val: str | None = None
    root: str | None = None
    allow_outside_root: bool = False


@dataclass
class TrainSection:
    """Optimisation. Defaults are the paper's: AdamW 3e-4, betas (0.9, 0.95), no weight decay,
    100 warm-up steps then linear decay to 0, gradient clipping 1.0."""

    seed: int = 0
    batch_size: int = 15
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 100
    clip_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"
    skip_nonfinite: bool = False
    find_unused_parameters: bool = False
    num_workers: int = 0
    threads: int | None = None


@dataclass
class ValidationSection:
    """Validation every ``every`` optimizer steps (0 = only at the end): teacher-forced masks, and with
    ``chained`` also the rounds chained from the model's own masks through ``mediround.inference.chain``
    (the code path ``mediround eval`` scores; JCM off)."""

    every: int = 500
    at_start: bool = True
    batch_size: int = 4
    max_dialogues: int | None = None
    chained: bool = True


@dataclass
class CheckpointSection:
    """A checkpoint every ``every`` optimizer steps and at the end; the last ``keep_last`` are kept."""

    every: int = 500
    keep_last: int = 3


@dataclass
class LogSection:
    """A training-log line (loss components, lr, samples/s) every ``every`` optimizer steps."""

    every: int = 10


class TrainingSettings:
    """What follows from a recipe's ``train`` section, for stage 1's ``Recipe`` and stage 2's ``JCMRecipe``."""

    train: TrainSection

    def global_batch(self, world_size: int) -> int:
        """Dialogues per optimizer step over all processes."""
        return self.train.batch_size * world_size * self.train.grad_accum

    def resolved_mixed_precision(self, on_gpu: bool) -> str:
        """``auto`` is bf16 on GPU and off on CPU (CPU autocast buys nothing on these models)."""
        if self.train.mixed_precision == "auto":
            return "bf16" if on_gpu else "no"
        return self.train.mixed_precision


@dataclass
class Recipe(TrainingSettings):
    """A whole run. ``model_preset`` names the ``MediRoundConfig`` preset the ``model`` section starts from."""

    output: str = ""
    model_preset: str = "tiny"
    model: MediRoundConfig = field(default_factory=MediRoundConfig)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    source: str = field(default="", compare=False)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (the ``model`` section in full, preset included)."""
        data = plain_data(self)
        data.pop("source")
        data["model"] = {"preset": data.pop("model_preset"), **data["model"]}
        return data

    @property
    def hash(self) -> str:
        """Identity of the run: everything but the output folder. A different hash is a different run."""
        data = self.to_dict()
        data.pop("output")
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML, apply ``key=value`` overrides, check every key, type and file."""
    return recipe_from_dict(read_recipe_file(path, overrides), str(path))


def read_recipe_file(path: str | Path, overrides: typing.Sequence[str] = ()) -> dict:
    """The sections of a recipe YAML as plain data, with ``key=value`` overrides applied (not yet checked)."""
    source = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{source}: recipe file not found") from None
    except (OSError, yaml.YAMLError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"{source}: cannot read recipe: {first_line}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        _apply_override(raw, override, source)
    return raw


def recipe_from_dict(raw: dict, source: str = "<recipe>") -> Recipe:
    """Build and check a ``Recipe`` from plain data (the parsed YAML)."""
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise RecipeError(f"{source}: key 'model': expected a mapping, got {type(model_raw).__name__}")
    model_raw = dict(model_raw)
    preset_name = model_raw.pop("preset", "tiny")
    if not isinstance(preset_name, str):
        raise RecipeError(f"{source}: key 'model.preset': expected a string, got {preset_name!r}")
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)} - {"model_preset", "source"}
    recipe = build_dataclass(Recipe, {k: v for k, v in raw.items()}, "", source, known=recipe_fields)
    recipe.model_preset = preset_name
    recipe.model = _model_config(preset_name, model_raw, source)
    recipe.source = source
    _check_values(recipe, source)
    return recipe


def check_output(recipe: Recipe, resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run, before anything is launched.

    A folder with a ``run.json`` of a different recipe hash is another run: refused unless ``overwrite``
    (which empties it). The same recipe without ``resume`` is refused too when it already has
    checkpoints, so that a finished run is never silently restarted.
    """
    output = Path(recipe.output)
    run_file = output / RUN_FILE
    if overwrite:
        if output.exists():
            shutil.rmtree(output)
        return
    if not run_file.exists():
        if output.exists() and any(output.iterdir()) and not resume:
            raise RecipeError(
                f"{recipe.source}: key 'output': folder {output} is not empty and holds no run; "
                "choose another output or pass --overwrite"
            )
        return
    try:
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        previous_hash = previous["recipe_hash"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise RecipeError(f"{run_file}: unreadable run file; pass --overwrite to start over") from None
    if previous_hash != recipe.hash:
        changed = _first_difference(previous.get("recipe", {}), recipe.to_dict())
        detail = f" (first difference: '{changed}')" if changed else ""
        raise RecipeError(
            f"{recipe.source}: key 'output': folder {output} holds another run (recipe {previous_hash}, "
            f"this recipe {recipe.hash}){detail}; choose another output or pass --overwrite"
        )
    if not resume and any((output / "checkpoints").glob("step-*")):
        raise RecipeError(
            f"{recipe.source}: key 'output': folder {output} already holds checkpoints of this recipe; "
            "pass --resume to continue it or --overwrite to start over"
        )


def run_record(recipe: Recipe) -> dict:
    """What ``run.json`` holds: the hash that identifies the run and the resolved recipe."""
    return {"recipe_hash": recipe.hash, "recipe": recipe.to_dict(), "source": recipe.source}


def _model_config(preset_name: str, overrides: dict, source: str) -> MediRoundConfig:
    paths = {}
    if preset_name != "tiny":
        paths = {
            "mllm_path": (overrides.get("mllm") or {}).get("source", ""),
            "sam_checkpoint": (overrides.get("segmenter") or {}).get("checkpoint"),
        }
    try:
        base = preset(preset_name, **paths).to_dict()
    except RecipeError as error:
        raise RecipeError(f"{source}: key 'model.preset': {error}") from None
    merged = _deep_merge(base, overrides)
    checked = build_dataclass(MediRoundConfig, merged, "model", source)
    try:
        return MediRoundConfig.from_dict(plain_data(checked))
    except RecipeError as error:
        raise RecipeError(f"{source}: key 'model': {error}") from None


def _check_values(recipe: Recipe, source: str) -> None:
    def fail(key: str, reason: str) -> None:
        raise RecipeError(f"{source}: key '{key}': {reason}")

    if not recipe.output:
        fail("output", "missing: name the folder that receives checkpoints and logs")
    if not recipe.data.train:
        fail("data.train", "missing: name the training dialogue file")
    for key in ("train", "val"):
        value = getattr(recipe.data, key)
        if value and not Path(value).is_file():
            fail(f"data.{key}", f"file not found: {value}")
    if recipe.data.root is not None and not Path(recipe.data.root).is_dir():
        fail("data.root", f"folder not found: {recipe.data.root}")
    positive = {
        "train.batch_size": recipe.train.batch_size,
        "train.grad_accum": recipe.train.grad_accum,
        "train.epochs": recipe.train.epochs,
        "validation.batch_size": recipe.validation.batch_size,
        "checkpoint.keep_last": recipe.checkpoint.keep_last,
        "log.every": recipe.log.every,
    }
    for key, value in positive.items():
        if value < 1:
            fail(key, f"must be at least 1, got {value}")
    non_negative = {
        "train.warmup_steps": recipe.train.warmup_steps,
        "train.weight_decay": recipe.train.weight_decay,
        "train.num_workers": recipe.train.num_workers,
        "validation.every": recipe.validation.every,
        "checkpoint.every": recipe.checkpoint.every,
    }
    for key, value in non_negative.items():
        if value < 0:
            fail(key, f"must not be negative, got {value}")
    if recipe.train.max_steps is not None and recipe.train.max_steps < 1:
        fail("train.max_steps", f"must be at least 1, got {recipe.train.max_steps}")
    if recipe.train.lr <= 0:
        fail("train.lr", f"must be positive, got {recipe.train.lr}")
    if not all(0 <= beta < 1 for beta in recipe.train.betas):
        fail("train.betas", f"each beta must be in [0, 1), got {list(recipe.train.betas)}")
    if recipe.train.clip_grad_norm is not None and recipe.train.clip_grad_norm <= 0:
        fail("train.clip_grad_norm", "must be positive (or null for no clipping)")
    if recipe.train.mixed_precision not in MIXED_PRECISION:
        fail("train.mixed_precision", f"{recipe.train.mixed_precision!r} is not one of {list(MIXED_PRECISION)}")
    if recipe.validation.max_dialogues is not None and recipe.validation.max_dialogues < 1:
        fail("validation.max_dialogues", "must be at least 1 (or null for all)")


def _apply_override(raw: dict, override: str, source: str) -> None:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"override {override!r}: expected dotted.key=value (e.g. train.lr=1e-3)")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {override!r}: key '{'.'.join(parts[: depth + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def build_dataclass(cls: type, data: Any, where: str, source: str, known: set[str] | None = None) -> Any:
    """An instance of dataclass ``cls`` from a mapping, each key and type checked (``RecipeError`` naming ``where``)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: key '{where}': expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if known is None or f.name in known}
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else str(name)
        if name not in fields:
            close = _closest(str(name), list(fields))
            hint = f" (did you mean '{f'{where}.' if where else ''}{close[0]}'?)" if close else ""
            known_list = "" if close else f"; known: {sorted(fields)}"
            raise RecipeError(f"{source}: unknown key '{key}'{hint}{known_list}")
        values[name] = _coerce(hints[name], value, key, source)
    return cls(**values)


def _closest(name: str, candidates: list[str]) -> list[str]:
    """The known key a typo most likely meant: by similarity, else one that starts the other."""
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    if close:
        return close
    lowered = name.lower()
    prefixed = [c for c in candidates if lowered.startswith(c.lower()) or c.lower().startswith(lowered)]
    return sorted(prefixed, key=lambda c: abs(len(c) - len(name)))[:1]


def _coerce(hint: Any, value: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build_dataclass(hint, value, key, source)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key, source)
            except RecipeError:
                continue
        raise _type_error(hint, value, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _type_error(hint, value, key, source)
        return tuple(_coerce(arg, item, f"{key}[{i}]", source) for i, (arg, item) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _type_error(hint, value, key, source)
        return [_coerce(args[0], item, f"{key}[{i}]", source) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(hint, value, key, source)
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(hint, value, key, source)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(hint, value, key, source)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _type_error(hint, value, key, source)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(hint, value, key, source)
    if hint is Any:
        return value
    raise _type_error(hint, value, key, source)


def _type_error(hint: Any, value: Any, key: str, source: str) -> RecipeError:
    expected = _type_name(hint)
    return RecipeError(f"{source}: key '{key}': expected {expected}, got {value!r} ({type(value).__name__})")


def _type_name(hint: Any) -> str:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def plain_data(obj: Any) -> Any:
    """Dataclasses, sequences and mappings as nested dicts and lists (what YAML and JSON hold)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain_data(item) for item in obj]
    if isinstance(obj, dict):
        return {key: plain_data(value) for key, value in obj.items()}
    return obj


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key == "output" and not prefix:
                continue
            found = _first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if old != new else None

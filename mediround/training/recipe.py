"""Training recipes of both stages: a YAML file plus dotted ``key=value`` overrides, checked by ``mediround.typed``.

Everything about a run is in the recipe. Stage 1 (``Recipe``): the model (a preset from
``mediround.model.config`` plus any ``MediRoundConfig`` field), the data files, the output folder and every
hyperparameter. Stage 2 (``JCMRecipe``): the frozen checkpoint folder and the JCM settings instead of the
model; the other sections are stage 1's. A recipe is validated completely before any process is launched:
every value by the typed loader (each rule declared with its field, or a section's ``model_validator``),
then the files and packages it names on this machine; every problem is ONE ``RecipeError`` line naming the
file and the dotted key (with the closest known key for a typo).

Relative paths in a recipe are resolved against the working directory, as command-line paths are.

The shipped recipes are the repository's top-level ``recipes/`` folder (its only copy), which a wheel carries
inside the package as ``mediround/recipes/`` (pyproject.toml maps it there): wherever a recipe path is taken,
a shipped recipe's NAME (``mediround-7b-4gpu``) or the repository path the docs use
(``recipes/mediround-7b-4gpu.yaml``) works as well, from any folder and any install.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import json
import shutil
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import Field, model_validator

from mediround.errors import RecipeError
from mediround.inference import DEFAULT_BETA
from mediround.model.config import FINE_TUNE_KEYS, MediRoundConfig, preset
from mediround.model.weight_sources import WEIGHTS_PAGE
from mediround.typed import check, load_typed, refuse, typed_config

MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
LossAveraging = Literal["weighted", "micro-batch-mean"]
BestMetric = Literal["giou", "ciou", "dice"]
BestOf = Literal["chained", "teacher_forced"]
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The experiment trackers ``log.report_to`` accepts, each with the package (and extra) it needs."""
Tracker = Literal[tuple(TRACKERS)]
RUN_FILE = "run.json"
RESUMABLE_KEYS = ("output", "train.max_steps", "log", "checkpoint")
"""What may change between a run and its ``--resume``, so is not part of the run's identity: the output
folder, how long it runs (the LR schedule follows the new total from the next step on) and how often it logs,
reports and checkpoints. Everything else changes what a step computes."""
def _shipped_recipes_folder() -> Path:
    package = Path(__file__).resolve().parents[1]
    # An installed wheel holds the recipes inside the package; a source checkout (editable install, or the
    # source folder on PYTHONPATH) has no such folder and keeps them at the top of the repository.
    return package / "recipes" if (package / "recipes").is_dir() else package.parent / "recipes"


SHIPPED_RECIPES = _shipped_recipes_folder()
PAPER_RECIPE = "mediround-7b-4gpu"
"""What ``mediround train`` runs without a RECIPE: the paper's setting on 4 GPUs."""
# A problem on this machine: the dotted key and why what it names is refused.
Problem = tuple[str, str]
Count = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
AtLeastOneOrAll = Annotated[int, check(lambda count: count >= 1, "must be at least 1 (or null for all)")]
Weight = Annotated[float, Field(ge=0)]
Unit = Annotated[float, check(lambda value: 0 <= value <= 1, "must be in [0, 1], got {value}")]


@typed_config
@dataclass
class DataSection:
    """Dialogue files (JSONL or MR-MedSeg JSON) and the folder their image/mask paths are relative to."""

    train: str = ""
    val: str | None = None
    root: str | None = None
    allow_outside_root: bool = False


@typed_config
@dataclass
class TrainSection:
    """Optimisation. Defaults are the paper's: AdamW 3e-4, betas (0.9, 0.95), no weight decay,
    100 warm-up steps then linear decay to 0, gradient clipping 1.0.

    ``loss_averaging`` says how a step's micro-batches (``grad_accum`` x processes) make one loss:
    ``weighted`` (default) weighs each micro-batch's token-mean CE and mask-mean BCE/Dice by its share of the
    global batch's tokens and masks, so the step is the loss of the global batch as one batch whatever its
    split; ``micro-batch-mean`` averages the micro-batch means, each micro-batch counting the same, as the
    authors' DeepSpeed run does (their loss divided by the accumulation steps, gradients averaged over GPUs)."""

    seed: int = 0
    batch_size: Count = 15
    grad_accum: Count = 1
    epochs: Count = 1
    max_steps: Count | None = None
    lr: Annotated[float, Field(gt=0)] = 3e-4
    betas: Annotated[tuple[float, float], check(lambda betas: all(0 <= beta < 1 for beta in betas),
                                                 "each beta must be in [0, 1), got {value}")] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: NonNegative = 100
    clip_grad_norm: Annotated[float, check(lambda norm: norm > 0, "must be positive (or null for no clipping)")] \
        | None = 1.0
    mixed_precision: MixedPrecision = "auto"
    skip_nonfinite: bool = False
    loss_averaging: LossAveraging = "weighted"
    find_unused_parameters: bool = False
    num_workers: NonNegative = 0
    threads: int | None = None


@typed_config
@dataclass
class ValidationSection:
    """Validation every ``every`` optimizer steps (0 = only at the end): teacher-forced masks, and with
    ``chained`` also the rounds chained from the model's own masks through ``mediround.inference.chain``
    (the code path ``mediround eval`` scores; JCM off)."""

    every: NonNegative = 500
    at_start: bool = True
    batch_size: Count = 4
    max_dialogues: AtLeastOneOrAll | None = None
    chained: bool = True


@typed_config
@dataclass
class AugmentSection:
    """Stage-1 changes to the training data that the paper does not make; all off by default and in every
    7B recipe (docs/model.md)."""

    reference_swap: Annotated[float, check(lambda p: 0 <= p <= 1, "is a probability, from 0 to 1, got {value}")] = 0.0
    """Probability that a referring round's crop and box are cut from the ground-truth mask of another round
    of the dialogue instead of its referenced round's, its target unchanged (``mediround.training.reference_swaps``):
    practice for the wrong references of chained inference."""


@typed_config
@dataclass
class CheckpointSection:
    """A checkpoint every ``every`` optimizer steps and at the end; the last ``keep_last`` are kept.

    ``keep_best`` (``giou``, ``ciou`` or ``dice``; null: off) also keeps ``checkpoints/best``: the MediRound
    checkpoint of the validation that scored highest so far on that metric, over all rounds of the
    validation dialogues, on the ``best_of`` track: ``chained`` (each round's reference is the model's own
    earlier mask; in stage 2 with JCM at ``jcm.beta``, the authors' choice in both stages) or, in stage 1,
    ``teacher_forced``. The step-0 validation (``validation.at_start``) is not a candidate, nor any after
    ``best_until_step`` (null: none is excluded): the authors' ``ckpt_model`` is the best of their first 9
    validations, the 10th and later are kept apart (ours: ``<output>/model``). Needs ``data.val``."""

    every: NonNegative = 500
    keep_last: Count = 3
    keep_best: BestMetric | None = None
    best_of: BestOf = "chained"
    best_until_step: Count | None = None


@typed_config
@dataclass
class LogSection:
    """A training-log line (loss components, lr, samples/s) every ``every`` optimizer steps, also sent to
    the experiment trackers of ``report_to`` (``tensorboard``, ``wandb``; none by default) through Accelerate."""

    every: Count = 10
    report_to: list[Tracker] = field(default_factory=list)


@typed_config
@dataclass
class JCMSection:
    """Stage-2 settings: loss weights (the paper's), the feature source, the validation threshold."""

    judge_weight: Weight = 2.0
    refine_bce_weight: Weight = 2.0
    refine_dice_weight: Weight = 0.5
    rollout: bool = False
    rollout_fraction: Unit = 1.0
    cache_features: bool = True
    beta: Unit = DEFAULT_BETA


@typed_config
@dataclass
class JCMValidationSection:
    """Validation every ``every`` optimizer steps (0: only at the end): judge/IoU rank correlation and
    chained Dice/cIoU with JCM at ``jcm.beta`` versus JCM off."""

    every: NonNegative = 0
    at_start: bool = False
    max_dialogues: AtLeastOneOrAll | None = 50


@typed_config
@dataclass
class RunRecipe:
    """What both stages' recipes share: the sections every run has (each stage adds its own ``validation``
    section), its identity, and what follows from its ``train`` section. ``OUTPUT_HOLDS`` says what the
    output folder receives besides checkpoints."""

    OUTPUT_HOLDS: ClassVar[str] = "logs"
    output: str = ""
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    # Set by the loader to the recipe file, never read from the YAML.
    source: str = field(default="", init=False, compare=False)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (what ``run.json`` records)."""
        data = plain_data(self)
        data.pop("source")
        return data

    def identity(self) -> dict:
        """What makes two runs the same run: everything but ``RESUMABLE_KEYS``."""
        return without_resumable_keys(self.to_dict())

    @property
    def hash(self) -> str:
        """Identity of the run. A different hash is a different run."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def global_batch(self, world_size: int) -> int:
        """Dialogues per optimizer step over all processes."""
        return self.train.batch_size * world_size * self.train.grad_accum

    def resolved_mixed_precision(self, on_gpu: bool) -> str:
        """``auto`` is bf16 on GPU and off on CPU (CPU autocast buys nothing on these models)."""
        if self.train.mixed_precision == "auto":
            return "bf16" if on_gpu else "no"
        return self.train.mixed_precision

    @model_validator(mode="after")
    def _names_output_and_data(self) -> RunRecipe:
        if not self.output:
            refuse("output", f"missing: name the folder that receives checkpoints and {self.OUTPUT_HOLDS}")
        if not self.data.train:
            refuse("data.train", "missing: name the training dialogue file")
        return self

    @model_validator(mode="after")
    def _keeps_best_only_with_validation(self) -> RunRecipe:
        if self.checkpoint.keep_best is not None and not self.data.val:
            refuse("checkpoint.keep_best", "needs validation dialogues: name data.val (or set keep_best: null)")
        return self

    def machine_problems(self) -> Iterator[Problem]:
        """What the stage's own keys name that this machine lacks (the shared sections': ``check_machine``)."""
        return iter(())


@typed_config
@dataclass
class Recipe(RunRecipe):
    """A stage-1 run. ``model_preset`` names the ``MediRoundConfig`` preset the ``model`` section starts from."""

    model: MediRoundConfig = field(default_factory=MediRoundConfig)
    validation: ValidationSection = field(default_factory=ValidationSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    init_from: str | None = None
    """A MediRound checkpoint folder to fine-tune from (``--init-from``): its weights, a new optimizer and
    schedule; its model config must equal ``model`` but for ``FINE_TUNE_KEYS``."""
    # Set by the loader, never read from the YAML (where the preset is ``model.preset``).
    model_preset: str = field(default="tiny", init=False)

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (the ``model`` section in full, preset included)."""
        data = super().to_dict()
        data["model"] = {"preset": data.pop("model_preset"), **data["model"]}
        return data

    def resolved_mixed_precision(self, on_gpu: bool) -> str:
        """``auto`` is bf16 on GPU; on CPU it is the model's precision (``no`` for fp32): the trainable
        weights are fp32 masters, so a bf16 model computes under autocast."""
        if self.train.mixed_precision == "auto" and not on_gpu:
            return {"fp32": "no"}.get(self.model.precision, self.model.precision)
        return super().resolved_mixed_precision(on_gpu)

    def identity(self) -> dict:
        """Also the manifest of the ``init_from`` checkpoint: other starting weights, another run."""
        data = super().identity()
        if self.init_from is not None:
            data["init_from_manifest"] = manifest_text(self.init_from)
        return data

    @model_validator(mode="after")
    def _autocasts_a_low_precision_model(self) -> Recipe:
        if self.model.precision != "fp32" and self.train.mixed_precision == "no":
            refuse("train.mixed_precision", f"'no' cannot train a {self.model.precision} model: the trainable "
                   "weights stay fp32, so compute must autocast (use auto or bf16)")
        return self

    @model_validator(mode="after")
    def _scores_the_best_of_track(self) -> Recipe:
        if self.checkpoint.keep_best is not None and self.checkpoint.best_of == "chained" and not self.validation.chained:
            refuse("checkpoint.best_of", "'chained' needs validation.chained: true (or best_of: teacher_forced)")
        return self

    def machine_problems(self) -> Iterator[Problem]:
        if self.init_from is not None:
            yield from self._init_from_problems()

    def _init_from_problems(self) -> Iterator[Problem]:
        """The ``init_from`` folder is a checkpoint whose architecture is the recipe's model (empty
        ``heads.entity_names`` are filled from the data at build time, so they are compared then, as weights)."""
        config_file = Path(self.init_from) / "config.json"
        if not (Path(self.init_from) / "manifest.json").is_file() or not config_file.is_file():
            yield "init_from", f"not a MediRound checkpoint folder (no manifest.json/config.json): {self.init_from}"
            return
        try:
            theirs = without_keys(MediRoundConfig.from_json(config_file).to_dict(), FINE_TUNE_KEYS)
        except RecipeError as error:
            yield "init_from", str(error)
            return
        ours = without_keys(self.model.to_dict(), FINE_TUNE_KEYS)
        if not ours["heads"]["entity_names"]:
            ours["heads"]["entity_names"] = theirs["heads"]["entity_names"]
        differs = first_difference(theirs, ours)
        if differs is not None:
            yield f"model.{differs}", (f"the init_from checkpoint {self.init_from} has a different architecture "
                                       f"({_value_at(theirs, differs)!r} there, {_value_at(ours, differs)!r} here)")


@typed_config
@dataclass
class JCMRecipe(RunRecipe):
    """A stage-2 run. ``model`` is the frozen MediRound checkpoint folder (``--model``). The optimiser
    defaults are stage 1's, as in the paper ("we keep the same hyperparameter settings")."""

    OUTPUT_HOLDS: ClassVar[str] = "the trained model"
    model: str = ""
    jcm: JCMSection = field(default_factory=JCMSection)
    validation: JCMValidationSection = field(default_factory=JCMValidationSection)

    def identity(self) -> dict:
        """Everything but the output folder, and the model folder's manifest (other weights, other run)."""
        data = super().identity()
        data["model_manifest"] = manifest_text(self.model)
        return data

    @model_validator(mode="after")
    def _names_a_model_apart_from_output(self) -> JCMRecipe:
        if not self.model:
            refuse("model", "missing: pass --model CKPT (a MediRound checkpoint folder from `mediround train`)")
        if self.output and Path(self.output).resolve() == Path(self.model).resolve():
            refuse("output", "must differ from the model folder (train-jcm writes a new checkpoint)")
        if self.checkpoint.keep_best is not None and self.checkpoint.best_of != "chained":
            refuse("checkpoint.best_of", "stage 2 validates chained rounds only (with JCM at jcm.beta): use 'chained'")
        return self

    def machine_problems(self) -> Iterator[Problem]:
        if not (Path(self.model) / "manifest.json").is_file():
            yield "model", f"not a MediRound checkpoint folder (no manifest.json): {self.model}"


def load_recipe(
    path: str | Path, overrides: typing.Sequence[str] = (), require_weights: bool = False, require_data: bool = True
) -> Recipe:
    """Read a stage-1 recipe YAML, apply ``key=value`` overrides, check every key, type and file;
    ``require_weights`` also refuses a recipe whose LLaVA folder or SAM checkpoint is missing (training
    needs them) and ``require_data=False`` accepts missing data files and root (``mediround doctor``
    reports weights and data as rows of its own)."""
    return recipe_from_dict(read_recipe_file(path, overrides), str(path), require_weights, require_data)


def load_jcm_recipe(path: str | Path, overrides: typing.Sequence[str] = ()) -> JCMRecipe:
    """Read a stage-2 recipe YAML, apply ``key=value`` overrides, check every key, type, file and folder."""
    source = str(path)
    recipe = load_typed(JCMRecipe, read_recipe_file(path, overrides), source)
    recipe.source = source
    check_machine(recipe)
    return recipe


def shipped_recipes() -> dict[str, Path]:
    """The shipped recipes (and DeepSpeed configs; ``SHIPPED_RECIPES``), by name (the file name without suffix)."""
    found = {path.stem: path for path in SHIPPED_RECIPES.iterdir() if path.suffix in (".yaml", ".json")}
    return dict(sorted(found.items()))


def shipped_recipe(name: str) -> Path:
    """The shipped recipe ``name`` (with or without its suffix); ``RecipeError`` lists the names otherwise."""
    shipped = shipped_recipes()
    path = shipped.get(Path(name).stem if Path(name).suffix in (".yaml", ".json") else name)
    if path is None:
        raise RecipeError(f"{name}: no shipped recipe of that name; shipped: {', '.join(shipped)}")
    return path


def resolve_recipe(path_or_name: str | Path) -> Path:
    """An existing file as it is; otherwise the shipped recipe named by ``path_or_name``'s file name (so
    ``recipes/x.yaml``, ``x.yaml`` and ``x`` all find the shipped ``x.yaml``); otherwise the path unchanged,
    for the caller's "not found" error."""
    path = Path(path_or_name)
    if path.exists():
        return path
    shipped = shipped_recipes()
    name = path.stem if path.suffix in (".yaml", ".json") else path.name
    return shipped.get(name, path)


def read_recipe_file(path: str | Path, overrides: typing.Sequence[str] = ()) -> dict:
    """The sections of a recipe YAML (a path or a shipped recipe's name) as plain data, with ``key=value``
    overrides applied (not yet checked)."""
    source = str(path)
    try:
        raw = yaml.safe_load(resolve_recipe(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{source}: recipe file not found, and no shipped recipe has that name (`mediround recipes` lists them)") from None
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


def recipe_from_dict(
    raw: dict, source: str = "<recipe>", require_weights: bool = False, require_data: bool = True
) -> Recipe:
    """Build and check a stage-1 ``Recipe`` from plain data (the parsed YAML)."""
    raw = dict(raw)
    model_raw = raw.pop("model", None) or {}
    if not isinstance(model_raw, dict):
        raise RecipeError(f"{source}: key 'model': expected a mapping, got {type(model_raw).__name__}")
    model_raw = dict(model_raw)
    preset_name = model_raw.pop("preset", "tiny")
    if not isinstance(preset_name, str):
        raise RecipeError(f"{source}: key 'model.preset': expected a string, got {preset_name!r}")
    recipe = load_typed(Recipe, {**raw, "model": _model_data(preset_name, model_raw, source)}, source)
    recipe.model_preset = preset_name
    recipe.source = source
    if require_weights:
        _check_files(recipe, _missing_weights(recipe.model))
    check_machine(recipe, require_data)
    return recipe


def _missing_weights(model: MediRoundConfig) -> list[Problem]:
    """The weight paths of a model config that are not on this machine."""
    missing = []
    if model.mllm.source != "tiny" and not Path(model.mllm.source).is_dir():
        missing.append(("model.mllm.source", f"folder not found: {model.mllm.source}"))
    if model.segmenter.checkpoint is not None and not Path(model.segmenter.checkpoint).is_file():
        missing.append(("model.segmenter.checkpoint", f"file not found: {model.segmenter.checkpoint}"))
    return missing


def _missing_data(recipe: RunRecipe) -> list[Problem]:
    files = [(f"data.{key}", getattr(recipe.data, key)) for key in ("train", "val")]
    return [(key, f"file not found: {path}") for key, path in files if path and not Path(path).is_file()]


def _check_files(recipe: RunRecipe, missing_weights: list[Problem]) -> None:
    """One line naming every missing weight and data file at once (a fresh machine lacks them all), with
    the page that says how to get the weights."""
    missing = missing_weights + _missing_data(recipe)
    if missing:
        where = "; ".join(f"key '{key}': {reason}" for key, reason in missing)
        page = f" ({WEIGHTS_PAGE} says how to get and convert the weights)" if missing_weights else ""
        raise RecipeError(f"{recipe.source}: {where}{page}")


def check_machine(recipe: RunRecipe, require_data: bool = True) -> None:
    """What loading cannot check: the files, folders and packages a checked recipe names are on this
    machine; the first problem as one ``RecipeError`` line (``require_data=False``: missing data files and
    root are not problems)."""
    for key, reason in _machine_problems(recipe, require_data):
        raise RecipeError(f"{recipe.source}: key '{key}': {reason}")


def _machine_problems(recipe: RunRecipe, require_data: bool) -> Iterator[Problem]:
    yield from recipe.machine_problems()
    if require_data:
        yield from _missing_data(recipe)
        if recipe.data.root is not None and not Path(recipe.data.root).is_dir():
            yield "data.root", f"folder not found: {recipe.data.root}"
    for tracker in recipe.log.report_to:
        if importlib.util.find_spec(TRACKERS[tracker]) is None:
            yield "log.report_to", (f"{tracker!r} needs the {TRACKERS[tracker]} package: "
                                    f"pip install -e \".[{tracker}]\"")


def check_output(recipe: RunRecipe, resume: bool, overwrite: bool) -> None:
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
        changed = first_difference(without_resumable_keys(previous.get("recipe", {})),
                                   without_resumable_keys(recipe.to_dict()))
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


def recorded_init_from(recipe: Recipe) -> str | None:
    """The ``init_from`` checkpoint the run in ``recipe.output`` was started with (its ``run.json``), if any."""
    try:
        return json.loads((Path(recipe.output) / RUN_FILE).read_text(encoding="utf-8"))["recipe"]["init_from"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None


def run_record(recipe: RunRecipe) -> dict:
    """What ``run.json`` holds: the hash that identifies the run and the resolved recipe."""
    return {"recipe_hash": recipe.hash, "recipe": recipe.to_dict(), "source": recipe.source}


def _model_data(preset_name: str, overrides: dict, source: str) -> dict:
    """The recipe's model section as plain data: the preset's config with the recipe's keys merged in
    (checked with the rest of the recipe)."""
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
    return _deep_merge(base, overrides)


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


def manifest_text(folder: str) -> str | None:
    """The manifest of a MediRound checkpoint folder as written (None when there is none)."""
    manifest = Path(folder) / "manifest.json"
    return manifest.read_text(encoding="utf-8") if manifest.is_file() else None


def without_resumable_keys(recipe: dict) -> dict:
    """A recipe's plain data (``to_dict``) without ``RESUMABLE_KEYS``."""
    return without_keys(recipe, RESUMABLE_KEYS)


def without_keys(data: dict, keys: typing.Sequence[str]) -> dict:
    """A copy of nested plain data without the dotted ``keys`` (a section name drops the whole section)."""
    data = copy.deepcopy(data)
    for key in keys:
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node.get(section, {})
        node.pop(name, None)
    return data


def _value_at(data: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def first_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first dotted key (in sorted order) whose value differs between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return prefix.rstrip(".") if old != new else None

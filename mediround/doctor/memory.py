"""Will the recipe fit in GPU memory? The model's own estimate, judged against the GPU, with a way out.

The estimate is ``mediround.model.memory.estimate_from_sizes`` on the sizes of the model built on the
meta device or, where it cannot be built (no weights' config.json on this machine), on the
``llava-med-7b`` preset's known sizes; this module collects its inputs from the recipe (batch size, the
longest sampled dialogue under the model's chat layout, else an assumed length, gradient checkpointing,
precision), divides the parts ZeRO partitions by the
number of processes (stage 1: optimiser states, 2: and gradients, 3: and weights), compares the peak
with the GPU memory and, when it does not fit, tries the usual remedies in order until one does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from mediround.data.formats import load_dialogues
from mediround.doctor.checks import FAIL, OK, WARN, CheckResult
from mediround.doctor.files import sample_indices
from mediround.doctor.stack import GpuInfo
from mediround.errors import MediRoundError
from mediround.model.build import build_model
from mediround.model.memory import (
    DEFAULT_SEQUENCE_LENGTH,
    MemoryEstimate,
    ModelSizes,
    estimate_from_sizes,
    known_sizes,
    model_sizes,
)
from mediround.training.recipe import Recipe, resolve_recipe

GIB = 1024**3
USABLE_FRACTION = 0.95


@dataclass
class MemoryFit:
    """The memory rows and, when the estimate knows the trainable size, the disk the checkpoints need."""

    rows: list[CheckResult]
    checkpoint_bytes: int | None = None


def zero_stage(deepspeed_config: str | None) -> int:
    """The ZeRO stage of a DeepSpeed JSON (0 without one); ``ValueError`` names what is wrong."""
    if deepspeed_config is None:
        return 0
    try:
        data = json.loads(resolve_recipe(deepspeed_config).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{deepspeed_config}: cannot read DeepSpeed config: {error}") from None
    stage = (data.get("zero_optimization") or {}).get("stage", 0) if isinstance(data, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{deepspeed_config}: field 'zero_optimization.stage': {stage!r} is not 0, 1, 2 or 3")
    return stage


def longest_sequence(recipe: Recipe, model, sample: int) -> int | None:
    """Tokens of the longest sampled training dialogue under the model's own chat layout (None: no dialogue)."""
    data = recipe.data
    try:
        dialogues = load_dialogues(data.train, root=data.root, allow_outside_root=data.allow_outside_root,
                                   require_labels=True).dialogues
    except MediRoundError:
        return None
    lengths = []
    for index in sample_indices(len(dialogues), sample):
        try:
            lengths.append(len(model.processor.layout.dialogue(dialogues[index])[0].ids))
        except ValueError:
            continue
    return max(lengths, default=None)


def shard_for_zero(estimate: MemoryEstimate, stage: int, world: int) -> MemoryEstimate:
    """What one process holds when ZeRO partitions optimiser states (stage >= 1), gradients (>= 2) and
    weights (3) over ``world`` processes."""
    if world <= 1:
        return estimate
    return dataclasses.replace(
        estimate,
        optimiser=math.ceil(estimate.optimiser / world) if stage >= 1 else estimate.optimiser,
        gradients=math.ceil(estimate.gradients / world) if stage >= 2 else estimate.gradients,
        weights=math.ceil(estimate.weights / world) if stage >= 3 else estimate.weights,
    )


@dataclass(frozen=True)
class Setup:
    """The knobs the remedies turn."""

    gradient_checkpointing: bool
    batch_size: int
    grad_accum: int
    zero_stage: int

    def describe(self) -> str:
        checkpointing = "on" if self.gradient_checkpointing else "off"
        return f"batch {self.batch_size} x accumulation {self.grad_accum}, gradient checkpointing {checkpointing}, ZeRO-{self.zero_stage}"


def measure_model(recipe: Recipe, sample: int) -> tuple[ModelSizes, int, str] | CheckResult:
    """The model's sizes, the sequence length and how both were found (the sizes of the model built on
    meta, else the preset's known sizes; the longest sampled dialogue, else an assumed length), or a WARN
    row when the sizes are unknown."""
    try:
        model = build_model(recipe.model, device="meta")
    except (MediRoundError, OSError, ValueError) as error:
        sizes = known_sizes(recipe.model_preset, recipe.model)
        if sizes is None:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            return CheckResult("GPU memory", WARN, f"not estimated: the model cannot be built on meta ({first})")
        # Without the LLaVA folder there is no tokenizer either, so no dialogue can be measured.
        length = None
        source = f"estimate from the {recipe.model_preset} preset's known sizes (the model cannot be built on meta)"
    else:
        sizes = model_sizes(model)
        length, source = longest_sequence(recipe, model, sample), "estimate from the model built on meta"
    if length is None:
        return sizes, DEFAULT_SEQUENCE_LENGTH, f"{DEFAULT_SEQUENCE_LENGTH} tokens assumed (no training dialogue to measure); {source}"
    return sizes, length, f"{length} tokens (longest sampled dialogue); {source}"


def check_memory(
    recipe: Recipe, gpus: list[GpuInfo], gpu_memory_gib: float | None, processes: int | None,
    deepspeed_config: str | None, sample: int,
) -> MemoryFit:
    """One row: the estimated peak per process against the GPU memory, with a remedy when it will not fit."""
    try:
        stage = zero_stage(deepspeed_config)
    except ValueError as error:
        return MemoryFit([CheckResult("GPU memory", FAIL, str(error))])
    measured = measure_model(recipe, sample)
    if isinstance(measured, CheckResult):
        return MemoryFit([measured])
    sizes, length, how = measured
    world = processes or max(1, len(gpus))
    setup = Setup(recipe.model.gradient_checkpointing, recipe.train.batch_size, recipe.train.grad_accum, stage)
    whole = estimate_from_sizes(recipe.model, sizes, setup.batch_size, length)
    # A checkpoint holds the trainable weights (model/ and trainable.safetensors) and the optimiser state;
    # one more is being written while keep_last are kept. A best checkpoint (keep_best) is a model/ folder,
    # two while one replaces the other.
    per_checkpoint = whole.optimiser + 2 * whole.gradients
    best_bytes = 2 * whole.gradients if recipe.checkpoint.keep_best is not None else 0
    checkpoint_bytes = per_checkpoint * (recipe.checkpoint.keep_last + 1) + best_bytes
    peak = shard_for_zero(whole, stage, world).total
    context = f"{world} process(es), {setup.describe()}, {recipe.model.precision} weights, {how}"
    if gpu_memory_gib is not None:
        capacity, where = int(gpu_memory_gib * GIB), f"--gpu-memory {gpu_memory_gib:g} GiB"
    elif gpus:
        smallest = min(gpus, key=lambda gpu: gpu.memory_bytes)
        capacity, where = smallest.memory_bytes, f"GPU {smallest.index} ({smallest.name})"
    else:
        detail = f"estimated peak {peak / GIB:.1f} GiB per process; no GPU to compare with (pass --gpu-memory GIB); {context}"
        return MemoryFit([CheckResult("GPU memory", WARN, detail)], checkpoint_bytes)
    usable = capacity * USABLE_FRACTION
    if peak <= usable:
        detail = f"estimated peak {peak / GIB:.1f} GiB per process fits {where} ({usable / GIB:.1f} GiB usable); {context}"
        return MemoryFit([CheckResult("GPU memory", OK, detail)], checkpoint_bytes)
    remedy = _remedy(recipe, sizes, setup, length, world, usable)
    detail = (
        f"estimated peak {peak / GIB:.1f} GiB per process does not fit {where} ({usable / GIB:.1f} GiB usable); "
        f"{context}; {remedy}"
    )
    return MemoryFit([CheckResult("GPU memory", FAIL, detail)], checkpoint_bytes)


def peak_bytes(recipe: Recipe, sizes: ModelSizes, setup: Setup, length: int, world: int) -> int:
    """The estimated peak of one process for ``recipe`` changed to ``setup``."""
    config = dataclasses.replace(recipe.model, gradient_checkpointing=setup.gradient_checkpointing)
    estimate = estimate_from_sizes(config, sizes, setup.batch_size, length)
    return shard_for_zero(estimate, setup.zero_stage, world).total


def remedies(setup: Setup, world: int) -> list[tuple[str, str, Setup]]:
    """Cumulative changes as (knob, how to set it, resulting setup), cheapest first: gradient
    checkpointing, smaller micro-batches with more accumulation (the same dialogues per step), then
    ZeRO-2 and ZeRO-3 when there are several processes."""
    steps = []
    current = setup
    if not current.gradient_checkpointing:
        current = dataclasses.replace(current, gradient_checkpointing=True)
        steps.append(("checkpointing", "model.gradient_checkpointing=true", current))
    per_process = current.batch_size * current.grad_accum
    for batch in sorted((d for d in range(1, current.batch_size) if per_process % d == 0), reverse=True):
        current = dataclasses.replace(current, batch_size=batch, grad_accum=per_process // batch)
        steps.append(("batch", f"train.batch_size={batch} train.grad_accum={per_process // batch}", current))
    for stage in (2, 3):
        if world > 1 and current.zero_stage < stage:
            current = dataclasses.replace(current, zero_stage=stage)
            steps.append(("zero", f"--deepspeed with zero_optimization.stage {stage}", current))
    return steps


def _remedy(recipe: Recipe, sizes: ModelSizes, setup: Setup, length: int, world: int, usable: float) -> str:
    changes: dict[str, str] = {}
    for knob, label, candidate in remedies(setup, world):
        changes[knob] = label
        peak = peak_bytes(recipe, sizes, candidate, length, world)
        if peak <= usable:
            return f"fits with {' '.join(changes.values())} (estimated {peak / GIB:.1f} GiB)"
    tried = " ".join(changes.values()) or "no change left to try"
    return f"does not fit even with {tried}: use a GPU with more memory, or more GPUs with ZeRO-3"

"""``mediround doctor``: a pre-flight check of the stack, hardware, weights, data, output and GPU memory.

Every check returns a ``CheckResult`` row; nothing is printed and nothing heavy is loaded (weight files
are read by header or memory-mapped, dialogue files are sampled). A ``FAIL`` row means the run would fail.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mediround.doctor import stack
from mediround.doctor.checks import FAIL, OK, WARN, CheckResult, any_failed
from mediround.errors import RecipeError

if TYPE_CHECKING:
    from mediround.doctor.stack import GpuInfo
    from mediround.training.recipe import Recipe

DEFAULT_SAMPLE = 32

__all__ = ["DEFAULT_SAMPLE", "FAIL", "OK", "WARN", "CheckResult", "DoctorConfig", "any_failed", "run_doctor"]


@dataclass
class DoctorConfig:
    """What to check. Without ``recipe`` only the stack and the hardware are checked.

    ``gpu_memory_gib`` judges the memory fit for a GPU of that size instead of the visible ones;
    ``processes`` is the number of training processes (GPUs) ZeRO shards over (default: the visible
    GPUs, at least 1); ``sample``: the files of the first N dialogues and N more (seeded) are checked.
    """

    recipe: str | None = None
    overrides: tuple[str, ...] = ()
    sample: int = DEFAULT_SAMPLE
    gpu_memory_gib: float | None = None
    processes: int | None = None
    deepspeed_config: str | None = None


def run_doctor(config: DoctorConfig, on_check: Callable[[CheckResult], None] | None = None) -> list[CheckResult]:
    """Run every check that applies and return the rows in order; ``on_check`` sees each row as it comes."""
    results: list[CheckResult] = []

    def add(*rows: CheckResult) -> None:
        for row in rows:
            results.append(row)
            if on_check is not None:
                on_check(row)

    add(*stack.check_versions(), stack.check_torchvision())
    gpus = stack.visible_gpus()
    add(stack.check_gpus(gpus))
    if config.recipe is None:
        add(stack.check_bf16(gpus, None))
        return results
    # Recipes and the weight/memory checks import torch: loaded only when a recipe is checked, so that
    # `mediround doctor --help` and the stack-only check stay fast.
    from mediround.training.recipe import load_recipe

    try:
        # Missing data files get the "train data"/"val data" rows, so that the other checks still run.
        recipe = load_recipe(config.recipe, config.overrides, require_data=False)
    except RecipeError as error:
        add(CheckResult("recipe", FAIL, str(error)))
        return results
    add(CheckResult("recipe", OK, f"{recipe.source}: preset {recipe.model_preset}, recipe hash {recipe.hash}"))
    needs_bf16 = recipe.model.precision == "bf16" or recipe.resolved_mixed_precision(on_gpu=bool(gpus)) == "bf16"
    add(stack.check_bf16(gpus, needs_bf16))
    _check_recipe(recipe, config, gpus, add)
    return results


def _check_recipe(recipe: Recipe, config: DoctorConfig, gpus: list[GpuInfo], add: Callable[..., None]) -> None:
    from mediround.doctor import files, memory, weights

    add(*weights.check_llava(recipe.model.mllm.source))
    add(weights.check_sam(recipe.model.segmenter))
    for name, path in (("train data", recipe.data.train), ("val data", recipe.data.val)):
        if path:
            add(files.check_dialogue_file(name, path, recipe.data.root, recipe.data.allow_outside_root, config.sample))
    fit = memory.check_memory(
        recipe, gpus, config.gpu_memory_gib, config.processes, config.deepspeed_config, config.sample
    )
    add(*fit.rows)
    add(*files.check_output(recipe, fit.checkpoint_bytes))

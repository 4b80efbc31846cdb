"""Data and output checks: a sampled file check of each dialogue file, the output folder and its disk."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

from mediround.data.formats import load_dialogues
from mediround.data.validate import check_dialogue_files
from mediround.doctor.checks import FAIL, OK, WARN, CheckResult
from mediround.errors import DataError, RecipeError
from mediround.training.recipe import Recipe
from mediround.training.recipe import check_output as check_output_folder

GIB = 1024**3
SAMPLE_SEED = 0


def sample_indices(count: int, first: int, seed: int = SAMPLE_SEED) -> list[int]:
    """The first ``first`` indices plus up to ``first`` more drawn from the rest with a fixed seed."""
    head = list(range(min(first, count)))
    rest = range(len(head), count)
    return head + sorted(random.Random(seed).sample(rest, min(first, len(rest))))


def check_dialogue_file(
    name: str, path: str, root: str | None, allow_outside_root: bool, sample: int, seed: int = SAMPLE_SEED
) -> CheckResult:
    """Parse the whole file (cheap) and check the images and masks of a sample of its dialogues.

    A file problem in the sample fails (training would stop on it); skipped dialogues only warn
    (training skips them too).
    """
    try:
        loaded = load_dialogues(path, root=root, allow_outside_root=allow_outside_root)
    except DataError as error:
        return CheckResult(name, FAIL, error.one_line())
    if not loaded.dialogues:
        first = f"; first problem: {loaded.problems[0].one_line()}" if loaded.problems else ""
        return CheckResult(name, FAIL, f"{path}: no usable dialogue{first}")
    indices = sample_indices(len(loaded.dialogues), sample, seed)
    image_sizes: dict = {}
    problems = [
        problem
        for index in indices
        for problem in check_dialogue_files(loaded.dialogues[index], loaded.format, path, image_sizes)
    ]
    head = min(sample, len(loaded.dialogues))
    checked = (
        f"files of {len(indices)} of {len(loaded.dialogues)} dialogues checked "
        f"(first {head} + {len(indices) - head} drawn with seed {seed})"
    )
    if problems:
        return CheckResult(
            name, FAIL, f"{len(problems)} file problem(s) ({checked}); first: {problems[0].one_line()}"
        )
    if loaded.problems:
        return CheckResult(
            name,
            WARN,
            f"{len(loaded.problems)} of {loaded.total} dialogues will be skipped; first: "
            f"{loaded.problems[0].one_line()}; {checked}",
        )
    return CheckResult(name, OK, f"{path} ({loaded.format}): {checked}")


def check_output(recipe: Recipe, needed_bytes: int | None) -> list[CheckResult]:
    """The output folder: writable (tested with a temporary file), free of another run, and disk to spare."""
    output = Path(recipe.output)
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [CheckResult("output", FAIL, f"{existing}: not a folder, cannot hold {output}")]
    try:
        handle, probe = tempfile.mkstemp(prefix=".mediround-doctor-", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return [CheckResult("output", FAIL, f"{existing}: not writable ({error.strerror or error})")]
    try:
        check_output_folder(recipe, resume=False, overwrite=False)
        folder = CheckResult("output", OK, f"{output}: writable")
    except RecipeError as error:
        folder = CheckResult("output", WARN, str(error))
    free = shutil.disk_usage(existing).free
    if needed_bytes is None:
        return [folder, CheckResult("disk", OK, f"{free / GIB:.1f} GiB free at {existing}")]
    verdict = OK if free >= needed_bytes else FAIL
    return [
        folder,
        CheckResult(
            "disk",
            verdict,
            f"{free / GIB:.1f} GiB free at {existing}; checkpoints need about {needed_bytes / GIB:.1f} GiB",
        ),
    ]

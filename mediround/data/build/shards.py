"""The build pipeline: cases -> dialogues and files, in worker processes and in shards; merging shards.

Every image's dialogue depends only on the seed and the image's id, and cases are always written in
sorted order, so the output is the same for any number of workers or shards. A case's split depends
only on its id (a hash), never on the seed, the shard or the slice: rebuilding never moves a case
between splits, and no case is ever in two splits.

A case or image that cannot be read is skipped; its problem goes to ``errors.jsonl`` in the output
folder (file, item, field, reason), the rest is built, and merging shards concatenates their logs.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from mediround.atomic import atomic_path, write_json
from mediround.data.build.dialogues import (
    SHAPE_LINKS,
    Planner,
    direction_links,
    image_rng,
    patient_orientation,
)
from mediround.data.build.sources import (
    Case,
    LabelledImage,
    SliceOptions,
    detect_kind,
    list_cases,
    load_images,
)
from mediround.data.build.volumes import SliceRule
from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats import load_dialogues
from mediround.data.formats.jsonl import write_jsonl
from mediround.data.formats.mrmedseg import write_mrmedseg
from mediround.data.images import save_mask
from mediround.data.synth.generator import SPLIT_FRACTIONS, SPLITS, difficulty_of
from mediround.error_log import ERRORS_FILE, read_error_log, write_error_log
from mediround.errors import DataError

MANIFEST = "build.json"
WRITERS = {"jsonl": (".jsonl", write_jsonl), "mrmedseg": (".json", write_mrmedseg)}
DEFAULT_SPLIT = tuple(round(100 * fraction) for fraction in SPLIT_FRACTIONS)
"""train/val/test percentages of the cases, as the synthetic benchmark splits its dialogues."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything that decides the output besides the source (kept in the manifest; shards must agree)."""

    seed: int = 0
    min_rounds: int = 2
    max_rounds: int = 6
    sides: str = "radiological"
    format: str = "jsonl"
    slices: SliceOptions = field(default_factory=SliceOptions)
    split: tuple[int, int, int] = DEFAULT_SPLIT


@dataclass
class CaseResult:
    case: str
    split: str
    dialogues: list[Dialogue] = field(default_factory=list)
    images: int = 0
    skipped: int = 0
    round_scenarios: Counter = field(default_factory=Counter)
    errors: list[dict] = field(default_factory=list)


@dataclass
class BuildSummary:
    """Counts for the CLI's table and for tests."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    cases: Counter = field(default_factory=Counter)
    dialogues: Counter = field(default_factory=Counter)
    images: int = 0
    skipped_images: int = 0
    rounds: int = 0
    round_scenarios: Counter = field(default_factory=Counter)
    reference_use: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    errors: list[dict] = field(default_factory=list)
    """errors.jsonl's records: the cases and images skipped because they could not be read."""
    errors_file: Path | None = None
    seconds: float = 0.0

    def add(self, result: CaseResult) -> None:
        self.cases[result.split] += 1
        self.images += result.images
        self.skipped_images += result.skipped
        self.round_scenarios += result.round_scenarios
        self.errors += result.errors
        for dialogue in result.dialogues:
            self.add_dialogue(result.split, dialogue)

    def add_dialogue(self, split: str, dialogue: Dialogue) -> None:
        self.dialogues[split] += 1
        self.rounds += len(dialogue.rounds)
        self.modalities[dialogue.modality or "-"] += len(dialogue.rounds)
        for round_ in dialogue.rounds:
            self.reference_use[reference_use(round_)] += 1

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def reference_use(round_: Round) -> str:
    if round_.ref is None:
        return "no reference"
    return "reference + name" if round_.names_target else "reference only"


def split_of(case: str, percentages: tuple[int, int, int] = DEFAULT_SPLIT) -> str:
    """train/val/test, by ``percentages`` of the cases, from a hash of the case id alone."""
    share = 100 * int.from_bytes(hashlib.sha256(case.encode("utf-8")).digest()[:8], "big") / 2**64
    bounds = (percentages[0], percentages[0] + percentages[1])
    return SPLITS[0] if share < bounds[0] else SPLITS[1] if share < bounds[1] else SPLITS[2]


def shard_cases(cases: list[Case], shard: tuple[int, int]) -> list[Case]:
    """The cases of 1-based shard ``i`` of ``n``: every n-th case of the sorted list, starting at i-1."""
    index, count = shard
    return cases[index - 1 :: count]


def plan_image(image: LabelledImage, options: BuildOptions) -> tuple[Dialogue, list] | None:
    """The dialogue of one image (paths relative to the output folder) and its round masks, or None."""
    orientation = (
        None if options.sides == "image"
        else (True if image.view in ("axial", "coronal") else patient_orientation(image.structures, image.modality, options.sides))
    )
    links = SHAPE_LINKS + direction_links(image.view, orientation)
    planned = Planner(image.structures, links).plan(image_rng(options.seed, image.id), options.min_rounds, options.max_rounds)
    if planned is None:
        return None
    scenario, rounds = planned
    dialogue = Dialogue(
        id=image.id,
        image=f"images/{image.id}.png",
        rounds=[
            Round(
                query=p.query,
                answer=p.answer,
                mask=f"masks/{image.id}_r{number}.png",
                ref=p.ref,
                entity=image.structures[p.target].name,
                difficulty="hard" if p.depth >= 2 else "regular",
                names_target=p.names_target,
            )
            for number, p in enumerate(rounds, start=1)
        ],
        modality=image.modality,
        scenario=scenario,
        difficulty=difficulty_of(rounds),
        source="build",
    )
    return dialogue, rounds


def build_case(case: Case, source: Path, out: Path, options: BuildOptions) -> CaseResult:
    """Dialogues of one case, their images and masks written under ``out`` (runs in a worker)."""
    images, problems = load_images(case, source, options.slices)
    result = CaseResult(case.id, split_of(case.id, options.split), images=len(images))
    result.errors = [problem.as_dict() for problem in problems]
    for image in images:
        planned = plan_image(image, options)
        if planned is None:
            result.skipped += 1
            continue
        dialogue, rounds = planned
        _write_image(out / dialogue.image, image)
        for round_, plan in zip(dialogue.rounds, rounds):
            save_mask(out / round_.mask, image.structures[plan.target].mask)
            result.round_scenarios[plan.scenario or "named"] += 1
        dialogue.root = out
        result.dialogues.append(dialogue)
    return result


def _write_image(path: Path, image: LabelledImage) -> None:
    with atomic_path(path) as tmp:
        if image.pixels is not None:
            Image.fromarray(image.pixels).save(tmp, format="PNG")
        else:
            shutil.copyfile(image.file, tmp)


def _build_case_star(arguments: tuple) -> CaseResult:
    return build_case(*arguments)


def build(
    source: str | os.PathLike,
    out: str | os.PathLike,
    kind: str | None = None,
    options: BuildOptions = BuildOptions(),
    workers: int = 1,
    shard: tuple[int, int] = (1, 1),
    progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Build dialogues from a labelled source into ``out`` (``<split>.jsonl``/``.json``, images/, masks/,
    build.json, errors.jsonl). ``progress(done, total)`` is called after each case."""
    source, out = Path(source), Path(out)
    kind = kind or detect_kind(source)
    if not 1 <= shard[0] <= shard[1]:
        raise DataError(str(out), None, "shard", f"shard {shard[0]}/{shard[1]} must be i/N with 1 <= i <= N")
    if out.exists() and not out.is_dir():
        raise DataError(str(out), None, None, "the output exists and is not a folder")
    cases = shard_cases(list_cases(source, kind), shard)
    summary = BuildSummary(out)
    start = time.perf_counter()
    results = run_cases(cases, source, out, options, workers, progress)
    for result in results:
        summary.add(result)
    manifest = {
        "source": str(source.resolve()),
        "kind": kind,
        "shard": list(shard),
        "options": asdict(options),
        "cases": {r.case: {"split": r.split, "dialogues": [d.id for d in r.dialogues]} for r in results},
    }
    _write_splits(out, results, options.format, summary)
    _write_errors(out, summary)
    write_json(out / MANIFEST, manifest)
    summary.seconds = time.perf_counter() - start
    return summary


def run_cases(
    cases: list[Case],
    source: Path,
    out: Path,
    options: BuildOptions,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[CaseResult]:
    """Build every case (in ``workers`` processes), results in the order of ``cases``."""
    jobs = [(case, source, out, options) for case in cases]
    results: list[CaseResult] = []
    if workers > 1:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for result in pool.imap(_build_case_star, jobs):
                results.append(result)
                if progress is not None:
                    progress(len(results), len(jobs))
        return results
    for job in jobs:
        results.append(build_case(*job))
        if progress is not None:
            progress(len(results), len(jobs))
    return results


def build_file(
    source: str | os.PathLike, output: str | os.PathLike, kind: str, target_format: str, options: BuildOptions
) -> BuildSummary:
    """Every split's dialogues in one file (``convert``): images and masks beside ``output``."""
    source, output = Path(source), Path(output)
    summary = BuildSummary(output.parent)
    start = time.perf_counter()
    results = run_cases(list_cases(source, kind), source, output.parent, options)
    for result in results:
        summary.add(result)
    WRITERS[target_format][1]([d for r in results for d in r.dialogues], output)
    summary.files["all"] = output
    summary.seconds = time.perf_counter() - start
    return summary


def _write_errors(out: Path, summary: BuildSummary) -> None:
    """errors.jsonl when something was skipped; a clean build removes an earlier run's, and writes none
    (an empty file would be one more ``*.jsonl`` beside the split files, and not a data file)."""
    path = out / ERRORS_FILE
    if summary.errors:
        write_error_log(path, summary.errors)
        summary.errors_file = path
    else:
        path.unlink(missing_ok=True)


def _write_splits(out: Path, results: list[CaseResult], format: str, summary: BuildSummary) -> None:
    suffix, writer = WRITERS[format]
    for split in SPLITS:
        dialogues = [d for r in results if r.split == split for d in r.dialogues]
        path = out / f"{split}{suffix}"
        if dialogues:  # an empty data file is not a valid one: a split without cases has no file
            writer(dialogues, path)
            summary.files[split] = path


def merge(shards: list[str | os.PathLike], out: str | os.PathLike) -> BuildSummary:
    """Join shard outputs into ``out``: files copied (hard-linked where possible), splits case-disjoint,
    dialogues in the order an unsharded build writes them."""
    out = Path(out)
    start = time.perf_counter()
    manifests = [(Path(shard), _read_manifest(Path(shard))) for shard in shards]
    first = manifests[0][1]
    cases: dict[str, dict] = {}
    owner: dict[str, Path] = {}
    for folder, manifest in manifests:
        for key in ("kind", "options"):
            if manifest[key] != first[key]:
                raise DataError(str(folder / MANIFEST), None, key, f"differs from {manifests[0][0] / MANIFEST}: shards of different builds")
        for case, entry in manifest["cases"].items():
            if case in cases:
                raise DataError(str(folder / MANIFEST), f"case {case}", "cases", f"also in {owner[case]}: shards overlap")
            cases[case], owner[case] = entry, folder
    fmt = first["options"]["format"]
    suffix, writer = WRITERS[fmt]
    by_id: dict[str, Dialogue] = {}
    for folder, _ in manifests:
        for split in SPLITS:
            path = folder / f"{split}{suffix}"
            if not path.exists():
                continue
            loaded = load_dialogues(path, format=fmt)
            if loaded.problems:
                raise loaded.problems[0]
            by_id.update({d.id: d for d in loaded.dialogues})
    summary = BuildSummary(out)
    by_split: dict[str, list[Dialogue]] = {split: [] for split in SPLITS}
    for case in sorted(cases):
        split = cases[case]["split"]
        summary.cases[split] += 1
        for dialogue_id in cases[case]["dialogues"]:
            dialogue = by_id[dialogue_id]
            for relative in [dialogue.image] + [r.mask for r in dialogue.rounds]:
                _link_or_copy(dialogue.path(relative), out / relative)
            by_split[split].append(dialogue)
            summary.add_dialogue(split, dialogue)
    summary.errors = [record for folder, _ in manifests for record in read_error_log(folder / ERRORS_FILE)]
    _write_errors(out, summary)
    for split, dialogues in by_split.items():
        if not dialogues:
            continue
        summary.files[split] = out / f"{split}{suffix}"
        writer([_rooted(d, out) for d in dialogues], summary.files[split])
    write_json(out / MANIFEST, {**first, "shard": [1, 1], "cases": {c: cases[c] for c in sorted(cases)}})
    summary.seconds = time.perf_counter() - start
    return summary


def _rooted(dialogue: Dialogue, root: Path) -> Dialogue:
    dialogue.root = root
    return dialogue


def _read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(folder / MANIFEST), None, None, "not found: not a build-dialogues output") from None
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(str(folder / MANIFEST), None, None, f"cannot read: {error}") from None


def _link_or_copy(source: Path, target: Path) -> None:
    with atomic_path(target) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)


__all__ = ["BuildOptions", "BuildSummary", "SliceOptions", "SliceRule", "build", "merge", "split_of"]

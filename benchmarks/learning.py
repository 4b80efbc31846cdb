"""Learning benchmark of the tiny recipe: does the reference path carry the referenced mask? Writes
docs/learning.md and PNG curves.

    python benchmarks/learning.py --work ../bench                  # 3 seeds x 2 models, 1 seed of each ablation
    python benchmarks/learning.py --work ../bench --seeds 0 --settings mediround history-blind --jcm

Each setting trains ``recipes/default-tiny.yaml`` (the shipped model's recipe; seed 0 of ``mediround`` is the
shipped model's stage 1) with ``mediround train`` on the synthetic benchmark in its MR-MedSeg style (answers
never name the target; no reference-only round can be resolved from the dialogue's text), worded with one half
of the generator's templates (``SYNTH_COMMAND``), changing only the output folder, the seed and the setting's
overrides:

- ``mediround``: the recipe as committed.
- ``history-blind``: the same recipe and steps on every round as a dialogue of its own without its reference
  (no history text, no crop/box tokens); each step sees as many rounds as a MediRound step.
- ``crop-only`` / ``box-only``: MediRound whose referring rounds carry only the crop token(s) or only the box
  token (``model.heads.reference_tokens``).
- ``paper-losses``: MediRound without the entity loss (``model.loss.entity=0``), the paper's objective.
- ``reference-swap``: MediRound whose referring rounds take a quarter of their training references from another
  round's mask (``augment.reference_swap=0.25``), practice for chained inference's wrong references.

Every final model is scored on the 50 test dialogues twice: as worded in training ("in-style") and worded
with the other half of the templates ("held-out", ``HELDOUT_COMMAND``: same images, rounds and references).
MediRound-like models run chained (each reference from the model's own earlier mask) and teacher-forced
(ground-truth reference masks) in one pass; the history-blind model has no references, so both are the same
for it. Each MediRound model is also scored teacher-forced with every reference replaced by the whole image
(crop = image, box = [0, 0, 1, 1]): the drop on reference-only rounds is what the referenced mask carries.
Scores are split by ``names_target``: "named" rounds (openings: solvable from their own query and the image)
and "ref-only" rounds (only the referenced round resolves them). Runs and evaluations whose outputs exist are
reused, so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_benchmark import (
    BLIND_BATCH,
    BLIND_DATA_OVERRIDES,
    HELDOUT_COMMAND,
    SYNTH_COMMAND,
    markdown_table,
    prepare_benchmark,
    score_lines,
)

from mediround.atomic import atomic_open
from mediround.data.formats import load_dialogues
from mediround.inference.model_eval import ModelEvalConfig, evaluate_model
from mediround.inference.settings import InferenceConfig
from mediround.metrics import aggregate, counts
from mediround.model import MASK_THRESHOLD, MediRoundConfig, load_sample
from mediround.model.checkpoint import load_checkpoint, save_checkpoint
from mediround.model.mllm import clip_normalise
from mediround.reports.rows import read_rows
from mediround.reports.scoring import EvalConfig
from mediround.training.recipe import SHIPPED_RECIPES

REPO = Path(__file__).resolve().parents[1]
RECIPE = SHIPPED_RECIPES / "default-tiny.yaml"
JCM_RECIPE = SHIPPED_RECIPES / "default-tiny-jcm.yaml"
SETTING_OVERRIDES = {
    "mediround": (),
    "history-blind": BLIND_DATA_OVERRIDES,
    "crop-only": ("model.heads.reference_tokens=crop",),
    "box-only": ("model.heads.reference_tokens=box",),
    "paper-losses": ("model.loss.entity=0",),
    "reference-swap": ("augment.reference_swap=0.25",),
}
LEADING_SETTINGS = ("mediround", "reference-swap")
"""The settings whose lead over the history-blind model the targets are checked for."""
SETTINGS = tuple(SETTING_OVERRIDES)
SPLITS = {"all": None, "named": True, "ref-only": False}
TEST_SETS = {"in-style": "synth/test", "held-out": "synth-heldout/test"}
TRACKS = {"chained": "predicted", "teacher-forced": "ground-truth"}
LEAD_TARGET, WHOLE_IMAGE_TARGET, HELDOUT_TARGET = 10.0, 5.0, 5.0


def run_command(args: Sequence[str], work: Path, log: Path) -> subprocess.Popen:
    """Start ``mediround ARGS`` in ``work``, its output to ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen([sys.executable, "-m", "mediround_cli.main", *args], cwd=work, stdout=handle,
                                stderr=subprocess.STDOUT)


def run_all(commands: Sequence[tuple[list[str], Path]], work: Path, parallel: int) -> None:
    """Run ``(args, log)`` commands, ``parallel`` at a time; stop the benchmark if one fails."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < parallel:
            args, log = pending.pop(0)
            print("$ mediround " + " ".join(args), flush=True)
            running.append((run_command(args, work, log), args, log))
        time.sleep(5)
        for item in list(running):
            process, args, log = item
            if process.poll() is not None:
                running.remove(item)
                if process.returncode != 0:
                    raise SystemExit(f"failed ({log}): mediround {' '.join(args)}")


def training_commands(work: Path, runs: Mapping[str, Sequence[int]], steps: int | None) -> list[tuple[list[str], Path]]:
    """The runs (setting -> seeds) not trained yet; blind runs first: they cost the most per step."""
    commands = []
    for setting in sorted(runs, key=lambda name: name != "history-blind"):
        for seed in runs[setting]:
            output = work / "runs" / f"{setting}-s{seed}"
            if (output / "model").is_dir():
                continue
            overrides = [f"output=runs/{setting}-s{seed}", f"train.seed={seed}", "--resume",
                         *SETTING_OVERRIDES[setting]]
            if steps is not None:
                overrides.append(f"train.max_steps={steps}")
            commands.append((["train", str(RECIPE), "--cpu", *overrides], work / "runs" / f"{setting}-s{seed}.log"))
    return commands


def jcm_commands(work: Path, seeds: Sequence[int]) -> list[tuple[list[str], Path]]:
    commands = []
    for seed in seeds:
        output = work / "runs" / f"jcm-s{seed}"
        if (output / "model").is_dir():
            continue
        commands.append((["train-jcm", str(JCM_RECIPE), "--cpu", "--model", f"runs/mediround-s{seed}/model",
                          f"output=runs/jcm-s{seed}", f"train.seed={seed}", "--resume"],
                         work / "runs" / f"jcm-s{seed}.log"))
    return commands


def curves(run: Path) -> dict[str, dict[int, float]]:
    """Teacher-forced validation Dice per step, per split."""
    rows = [r for r in pq.read_table(run / "validation.parquet").to_pylist() if r["track"] == "teacher_forced"]
    result: dict[str, dict[int, float]] = {name: {} for name in SPLITS}
    for row in rows:
        for name, named in SPLITS.items():
            if (named is None and row["split"] == "all") or (row["split"] == "names_target" and row["names_target"] is named):
                result[name][row["step"]] = row["dice"]
    return result


def split_dice(rows: Sequence[Mapping]) -> dict[str, float]:
    """Dice (0-1, pooled over rounds as ``aggregate`` does) per split of ``SPLITS``."""
    result = {}
    for name, named in SPLITS.items():
        chosen = [r for r in rows if named is None or r["names_target"] is named]
        if chosen:
            result[name] = aggregate(chosen).dice
    return result


def evaluation_scores(work: Path, setting: str, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """test set -> track -> split -> Dice of a run's final model (evaluations cached under WORK/eval)."""
    blind = setting == "history-blind"
    model = work / "runs" / f"{setting}-s{seed}" / "model"
    scores: dict[str, dict[str, dict[str, float]]] = {}
    for test_set, stem in TEST_SETS.items():
        out = work / "eval" / f"{setting}-s{seed}" / test_set
        rows_file = out / "rows.parquet"
        if not rows_file.is_file():
            data = work / "data" / f"{stem}{'-blind' if blind else ''}.jsonl"
            config = InferenceConfig(data=str(data), model=str(model), out=str(out), betas=(None,),
                                     teacher_forcing=(False,) if blind else (False, True), device="cpu")
            evaluate_model(ModelEvalConfig(config, EvalConfig(out=rows_file)))
        rows = read_rows(rows_file)
        if blind:
            # No references: chained and teacher-forced are the same run.
            scores[test_set] = {track: split_dice(rows) for track in TRACKS}
        else:
            scores[test_set] = {track: split_dice([r for r in rows if r["references"] == references])
                                for track, references in TRACKS.items()}
    return scores


def novel_rounds(work: Path, tokenizer_folder: Path) -> tuple[set[tuple[str, int]], int]:
    """(dialogue id, round) of the held-out test rounds whose query holds a token that no training query or
    answer holds, and the number of held-out rounds: words a model trained from scratch has never seen."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)

    def ids(text: str) -> list[int]:
        return tokenizer(f" {text}", add_special_tokens=False).input_ids

    seen = {i for d in load_dialogues(work / "data" / "synth" / "train.jsonl").dialogues for r in d.rounds
            for i in ids(r.query) + ids(r.answer)}
    held_out = load_dialogues(work / "data" / "synth-heldout" / "test.jsonl").dialogues
    novel = {(d.id, number) for d in held_out for number, r in enumerate(d.rounds, start=1)
             if any(i not in seen for i in ids(r.query))}
    return novel, sum(len(d.rounds) for d in held_out)


def novelty_scores(work: Path, setting: str, seed: int, novel: set[tuple[str, int]]) -> dict[str, dict[str, float]]:
    """Reference-only Dice of a MediRound-like run, chained and teacher-forced, on the held-out rounds whose
    query holds an unseen token ("novel") and on the others ("seen"), and in-style on the same rounds."""
    result: dict[str, dict[str, float]] = {}
    for test_set in TEST_SETS:
        rows = [r for r in read_rows(work / "eval" / f"{setting}-s{seed}" / test_set / "rows.parquet")
                if r["names_target"] is False]
        for track, references in TRACKS.items():
            for group in ("novel", "seen"):
                chosen = [r for r in rows if r["references"] == references
                          and ((r["dialogue_id"], r["round"]) in novel) == (group == "novel")]
                result.setdefault(f"{test_set}, {track}", {})[group] = aggregate(chosen).dice
    return result


def paper_rule_dice(work: Path, setting: str, seed: int) -> dict[str, float]:
    """Chained in-style Dice per split of a run's model with ``heads.reference_min_fragment=0``: each
    reference cut around every pixel of the predicted mask, stray fragments included (the paper's rule)."""
    folder = work / "eval" / f"{setting}-s{seed}" / "paper-reference-rule"
    rows_file = folder / "rows.parquet"
    if not rows_file.is_file():
        source = work / "runs" / f"{setting}-s{seed}" / "model"
        config = MediRoundConfig.from_json(source / "config.json")
        config.heads.reference_min_fragment = 0.0
        save_checkpoint(load_checkpoint(source, config=config), folder / "model")
        inference = InferenceConfig(data=str(work / "data" / f"{TEST_SETS['in-style']}.jsonl"), model=str(folder / "model"),
                                    out=str(folder / "predictions"), betas=(None,), teacher_forcing=(False,), device="cpu")
        evaluate_model(ModelEvalConfig(inference, EvalConfig(out=rows_file)))
    return split_dice(read_rows(rows_file))


ROUND_KINDS = ("target named in the query", "target described", "reference-only")


def round_kinds(work: Path) -> dict[tuple[str, int], str]:
    """(dialogue id, round) of every test round -> its kind: a query that names the target entity (e.g.
    "Segment the liver."), one that describes it ("the organ that pumps blood"), or a reference-only round.
    Both wordings of a round are of the same kind; the held-out one is read."""
    kinds = {}
    for dialogue in load_dialogues(work / "data" / "synth-heldout" / "test.jsonl").dialogues:
        for number, round_ in enumerate(dialogue.rounds, start=1):
            kind = ROUND_KINDS[2] if not round_.names_target else ROUND_KINDS[0 if round_.entity in round_.query else 1]
            kinds[(dialogue.id, number)] = kind
    return kinds


def round_kind_scores(work: Path, setting: str, seed: int, kinds: Mapping[tuple[str, int], str]) -> dict[str, dict[str, float]]:
    """"test set, track" -> round kind -> Dice of a MediRound-like run."""
    result: dict[str, dict[str, float]] = {}
    for test_set in TEST_SETS:
        rows = read_rows(work / "eval" / f"{setting}-s{seed}" / test_set / "rows.parquet")
        for track, references in TRACKS.items():
            for kind in ROUND_KINDS:
                chosen = [r for r in rows if r["references"] == references and kinds[(r["dialogue_id"], r["round"])] == kind]
                result.setdefault(f"{test_set}, {track}", {})[kind] = aggregate(chosen).dice
    return result


@torch.no_grad()
def whole_image_reference_dice(model_folder: Path, data: Path) -> dict[str, float]:
    """Teacher-forced Dice with every reference replaced by the whole image: what is left without it."""
    model = load_checkpoint(model_folder)
    model.eval()
    samples = [load_sample(d) for d in load_dialogues(data).dialogues]
    rows = []
    for start in range(0, len(samples), 10):
        chunk = samples[start : start + 10]
        batch = model.processor.collate(chunk)
        images = [clip_normalise(torch.from_numpy(s.image.astype(np.float32)).permute(2, 0, 1)[None], model.processor.crop_size)
                  for s in chunk for r in s.dialogue.rounds if r.ref is not None]
        if images:
            batch.crop_pixels = torch.cat(images)
            batch.boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(images), 4).clone()
        output = model(batch)
        for row, (sample, logits) in enumerate(zip(chunk, output.mask_logits)):
            mask_counts = counts((logits > MASK_THRESHOLD).numpy(), batch.target_masks[row].numpy() > 0.5)
            rows += [{"names_target": round_.names_target, **{key: values[index] for key, values in mask_counts.items()}}
                     for index, round_ in enumerate(sample.dialogue.rounds)]
    return split_dice(rows)


def jcm_spearman(run: Path) -> dict[str, float]:
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = [e for e in events if e["event"] == "validation"][-1]
    return {k: v for k, v in last.items() if k.startswith("spearman")}


def mean_sd(values: Sequence[float]) -> str:
    values = [100 * v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}"


def mean_points(values: Sequence[float]) -> float:
    return 100 * float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Folder for data and runs (outside the repository).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS,
                        default=["mediround", "history-blind", "crop-only", "box-only"])
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0],
                        help="Seeds of crop-only, box-only and paper-losses [default: 0].")
    parser.add_argument("--swap-seeds", type=int, nargs="+", default=[0, 1],
                        help="Seeds of reference-swap [default: 0 1; two seeds showed it loses, see the discussion].")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run [default: the recipe's].")
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (one thread each).")
    parser.add_argument("--jcm", action="store_true", help="Also train the JCM of every mediround run.")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work.resolve()
    prepare_benchmark(work)
    (work / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    seeds_of = {"mediround": args.seeds, "history-blind": args.seeds, "reference-swap": args.swap_seeds}
    runs = {setting: seeds_of.get(setting, args.ablation_seeds) for setting in args.settings}
    run_all(training_commands(work, runs, args.steps), work, args.parallel)
    jcm_seeds = args.seeds if args.jcm and "mediround" in args.settings else []
    run_all(jcm_commands(work, jcm_seeds), work, args.parallel)

    results: dict[str, list[dict]] = {}
    kinds = round_kinds(work)
    for setting, seeds in runs.items():
        for seed in seeds:
            run = work / "runs" / f"{setting}-s{seed}"
            entry = {"seed": seed, "curves": curves(run), "test": evaluation_scores(work, setting, seed)}
            if setting != "history-blind":
                entry["whole_image"] = whole_image_reference_dice(run / "model", work / "data" / "synth" / "test.jsonl")
                entry["paper_rule"] = paper_rule_dice(work, setting, seed)
            if setting == "mediround":
                novel, held_out_rounds = novel_rounds(work, run / "model" / "tokenizer")
                entry["novelty"] = novelty_scores(work, setting, seed, novel)
                entry["novel_rounds"] = (len(novel), held_out_rounds)
                entry["kinds"] = round_kind_scores(work, setting, seed, kinds)
                entry["kind_counts"] = {kind: sum(value == kind for value in kinds.values()) for kind in ROUND_KINDS}
            if seed in jcm_seeds and setting == "mediround":
                entry["jcm"] = jcm_spearman(work / "runs" / f"jcm-s{seed}")
            results.setdefault(setting, []).append(entry)
    figures = args.docs / "learning"
    figures.mkdir(parents=True, exist_ok=True)
    write_page(results, args, figures, (time.monotonic() - started) / 60)
    print(json.dumps({setting: [{"seed": e["seed"], **e["test"]} for e in entries]
                      for setting, entries in results.items()}))


def dice_values(entries: Sequence[dict], test_set: str, track: str, split: str) -> list[float]:
    return [e["test"][test_set][track][split] for e in entries]


def lead_lines(results: Mapping[str, list[dict]]) -> list[str]:
    """The issue's three targets, each with the measured numbers and whether it is reached."""
    lines = []
    blind = results.get("history-blind", [])
    for setting in [name for name in LEADING_SETTINGS if results.get(name)]:
        ours = results[setting]
        lines.append(f"`{setting}`:")
        lines.append("")
        # The blind model's runs of the same seeds.
        paired = [e for e in blind if e["seed"] in {mine["seed"] for mine in ours}]
        if paired:
            for track in TRACKS:
                mine = mean_points(dice_values(ours, "in-style", track, "ref-only"))
                theirs = mean_points(dice_values(paired, "in-style", track, "ref-only"))
                by_seed = ", ".join(f"{100 * (a['test']['in-style'][track]['ref-only'] - b['test']['in-style'][track]['ref-only']):+.1f}"
                                    for a, b in zip(ours, paired))
                lines.append(f"- ahead of the history-blind model by >= {LEAD_TARGET:g} Dice points on reference-only "
                             f"rounds, {track}: {mine:.1f} vs {theirs:.1f}, {mine - theirs:+.1f} (by seed {by_seed}) "
                             f"({'reached' if mine - theirs >= LEAD_TARGET else 'NOT reached'}).")
            paper_rule = mean_points([e["paper_rule"]["ref-only"] for e in ours])
            theirs = mean_points(dice_values(paired, "in-style", "chained", "ref-only"))
            lines.append(f"- for comparison, chained with the paper's reference rule (`heads.reference_min_fragment=0`, "
                         f"stray fragments of predicted masks kept in the crop and box): {paper_rule:.1f} vs {theirs:.1f}, "
                         f"{paper_rule - theirs:+.1f}.")
        forced = mean_points(dice_values(ours, "in-style", "teacher-forced", "ref-only"))
        whole = mean_points([e["whole_image"]["ref-only"] for e in ours])
        lines.append(f"- whole-image references cost >= {WHOLE_IMAGE_TARGET:g} points on reference-only rounds "
                     f"(teacher-forced): {forced:.1f} -> {whole:.1f}, {whole - forced:+.1f} "
                     f"({'reached' if forced - whole >= WHOLE_IMAGE_TARGET else 'NOT reached'}).")
        for track in TRACKS:
            in_style = mean_points(dice_values(ours, "in-style", track, "ref-only"))
            held_out = mean_points(dice_values(ours, "held-out", track, "ref-only"))
            lines.append(f"- held-out phrasings within {HELDOUT_TARGET:g} points of the in-style ones (reference-only, "
                         f"{track}): {in_style:.1f} vs {held_out:.1f}, {held_out - in_style:+.1f} "
                         f"({'reached' if abs(held_out - in_style) <= HELDOUT_TARGET else 'NOT reached'}).")
        lines.append("")
    return lines


def novelty_section(results: Mapping[str, list[dict]]) -> str:
    """Held-out vs in-style Dice of MediRound's reference-only rounds, split by whether the held-out query
    holds a token that never occurs in the training text."""
    entries = [e for e in results.get("mediround", []) if "novelty" in e]
    if not entries:
        return ""
    novel, total = entries[0]["novel_rounds"]
    rows = []
    for track in TRACKS:
        for group, label in (("novel", "a word never seen in training"), ("seen", "only words seen in training")):
            in_style = [e["novelty"][f"in-style, {track}"][group] for e in entries]
            held_out = [e["novelty"][f"held-out, {track}"][group] for e in entries]
            rows.append([track, label, mean_sd(in_style), mean_sd(held_out)])
    table = markdown_table(["track", "held-out query holds", "in-style wording", "held-out wording"], rows)
    counts = entries[0]["kind_counts"]
    kind_rows = [[kind, str(counts[kind]), track, mean_sd([e["kinds"][f"in-style, {track}"][kind] for e in entries]),
                  mean_sd([e["kinds"][f"held-out, {track}"][kind] for e in entries])]
                 for kind in ROUND_KINDS for track in TRACKS]
    kind_table = markdown_table(["round", "rounds", "track", "in-style wording", "held-out wording"], kind_rows)
    return (f"{novel} of the {total} held-out test rounds have a query with a token that no training query or answer "
            f"holds. MediRound's reference-only Dice on the same rounds, by that:\n\n{table}\n\n"
            f"MediRound's Dice by what the query carries: the target's name (a word seen in training in both "
            f"wordings), a description of it, or a relation to the referenced round:\n\n{kind_table}")


def write_page(results: Mapping[str, list[dict]], args: argparse.Namespace, figures: Path, minutes: float) -> None:
    steps = max(max(e["curves"]["all"]) for entries in results.values() for e in entries)
    header = ["setting", "seeds", "named, chained", "named, teacher-forced", "ref-only, chained",
              "ref-only, teacher-forced", "ref-only, whole-image references", "ref-only, chained, paper's reference rule"]
    main_rows, heldout_rows = [], []
    for setting, entries in results.items():
        cells = [mean_sd(dice_values(entries, "in-style", track, split)) for split in ("named", "ref-only")
                 for track in TRACKS]
        whole = [e["whole_image"]["ref-only"] for e in entries if "whole_image" in e]
        paper_rule = [e["paper_rule"]["ref-only"] for e in entries if "paper_rule" in e]
        main_rows.append([setting, str(len(entries)), *cells, mean_sd(whole) if whole else "–",
                          mean_sd(paper_rule) if paper_rule else "–"])
        heldout_rows.append([setting, str(len(entries)), *(
            f"{mean_sd(dice_values(entries, 'in-style', track, split))} / {mean_sd(dice_values(entries, 'held-out', track, split))}"
            for split in ("named", "ref-only") for track in TRACKS)])
    for split in SPLITS:
        series = {}
        for setting, entries in results.items():
            shared = sorted(set.intersection(*(set(e["curves"][split]) for e in entries)))
            label = f"{setting} ({len(entries)} seed{'s' if len(entries) > 1 else ''})"
            series[label] = {s: 100 * float(np.mean([e["curves"][split][s] for e in entries])) for s in shared}
        score_lines(series, figures / f"dice-{split}.png", f"teacher-forced validation Dice, {split} rounds "
                   "(mean over seeds)", "optimizer step")
    jcm = ""
    with_jcm = [e for e in results.get("mediround", []) if "jcm" in e]
    if with_jcm:
        jcm = "\n".join(f"- seed {e['seed']}: " + ", ".join(f"{k} {v:.3f}" for k, v in e["jcm"].items()) for e in with_jcm)
        jcm = f"JCM judge vs true IoU (Spearman, `mediround train-jcm` with {JCM_RECIPE.name}):\n\n{jcm}\n"
    flags = f" --seeds {' '.join(map(str, args.seeds))} --settings {' '.join(args.settings)}"
    flags += f" --ablation-seeds {' '.join(map(str, args.ablation_seeds))}" + (" --jcm" if args.jcm else "")
    if "reference-swap" in args.settings:
        flags += f" --swap-seeds {' '.join(map(str, args.swap_seeds))}"
    page = f"""# Learning benchmark of the tiny recipe: the reference path

Regenerated by `python benchmarks/learning.py --work DIR{flags}` (this invocation: {minutes:.0f} min on 2 CPU
cores, {args.parallel} training runs at a time; runs and evaluations already made are reused, and the discussion gives
the training times). Recipe:
`recipes/{RECIPE.name}`, {steps} optimizer steps per run; history-blind runs see {BLIND_BATCH} single-round
dialogues per step (as many rounds as a MediRound step).

Data: `{SYNTH_COMMAND}` (train, validation and the in-style test) and `{HELDOUT_COMMAND}` (the same 50 test
dialogues worded with the template half never seen in training). MR-MedSeg-style answers: no answer names its
target, and the generator plans no reference-only round whose entity the dialogue's text alone determines
(its summary counts 0 such rounds). Scores are Dice x100 on the test split, mean ± standard deviation over
seeds; "named" rounds are solvable from their own query and the image, "ref-only" rounds only through the
referenced round.

{markdown_table(header, main_rows)}

In-style / held-out phrasings:

{markdown_table(["setting", "seeds", "named, chained", "named, teacher-forced", "ref-only, chained", "ref-only, teacher-forced"], heldout_rows)}

{novelty_section(results)}

Targets (means over seeds, test split):

{chr(10).join(lead_lines(results))}

![Dice, all rounds](learning/dice-all.png)
![Dice, named rounds](learning/dice-named.png)
![Dice, reference-only rounds](learning/dice-ref-only.png)

{jcm}
## Discussion

{DISCUSSION}"""
    with atomic_open(args.docs / "learning.md") as handle:
        handle.write(page)


DISCUSSION = """Written for the runs of 2026-11-30 and 2026-12-01 (fourth to sixth sessions). The runs were trained
beforehand by the same commands, two or three at a time on the 2 cores, one thread each: 28 to 33 minutes for
a MediRound run, 45 to 60 for a history-blind run (34 images a step instead of 8), 37 for the crop-only run,
40 for a reference-swap run. They were trained before `heads.reference_min_fragment` existed and were then
given the recipe's 0.1 in their `config.json` (weights untouched): the key changes no training reference
of this benchmark, whose 2,060 ground-truth masks are each one connected part, so this is the model the
current recipe trains (checked: 30 steps of the recipe with the key at 0.1 and at 0 write byte-identical
weight files). If you regenerate this page with other runs, check that the text still fits the
numbers above.

**The recipe.** `recipes/default-tiny.yaml` is the earlier tiny recipe (entity loss, Fourier box token)
trained for 1,500 steps instead of 400, with stray fragments of a referenced mask left out of its crop and
box (`heads.reference_min_fragment=0.1`, below). The curves ask for no more training: teacher-forced
validation Dice of seed 0 is 79.7, 78.9, 79.9 and 81.3 at steps 750, 1000, 1250 and 1500, on
reference-only rounds 77.4 to 78.1 from step 750 on, while at 400 steps it was still rising steeply. Each
deviation from the paper is a key, off in the 7B recipes, and said in `docs/model.md`.

**The referenced mask carries the reference-only rounds: reached.** With ground-truth references MediRound
scores 82.7 on reference-only rounds, 31.5 points above the history-blind model (by seed +28.9, +35.1,
+30.5). Replacing every reference with the whole image (crop = the image, box = [0, 0, 1, 1]) drops it to
39.9, below the blind model: the dialogue's text no longer says which entity is meant, so without the mask
the model is lost. On the first benchmark, whose answers named the targets, the same replacement cost 2.4
points. The box-only model (one seed) scores as the full model with teacher forcing (82.7) and higher
chained (68.3), while the crop-only model scores 49.0 on reference-only rounds chained, teacher-forced and
with whole-image references alike, the level of the blind model: it ignores its crop. At this size the box
token carries the reference; the crop token, the CLS of a randomly initialised tiny CLIP tower, carries
nothing the model uses.

**Chained, the lead is +13.0 points: reached** (64.1 vs 51.1; by seed +12.8, +18.3 and +7.9). It was +8.9
with the paper's reference rule (last column of the first table: 60.1), and what changed is how a reference
is cut from a predicted mask. Because the model reads its reference from the box, a predicted mask with a
few stray pixels far from its structure points it somewhere else: of the 13 seed-0 reference-only rounds
that failed (Dice < 0.3) although their reference scored above 0.7, 10 had such a stretched box, e.g. a
right lung of Dice 0.98 whose box ran from x = 12 to 106 instead of 12 to 56. Leaving out the parts of a
referenced mask that hold under 10% of its pixels (`heads.reference_min_fragment=0.1`, chosen on the
validation split: chained reference-only Dice, mean of 3 seeds, 64.3 at 0, 72.8 at 0.05, 73.0 at 0.1, 71.9
at 0.2, 70.7 at 0.5) lifts chained reference-only Dice by seed from 63.5, 61.7, 54.9 to 66.1, 66.8, 59.5;
teacher-forced scores do not change (ground-truth masks are one part). What limits it now is wrong entities:
split by the referenced round's own chained Dice (mean Dice per round, seeds 0/1/2), reference-only rounds
with a good reference (above 0.7, 71-73% of them) score 0.84/0.87/0.79 (0.77/0.83/0.71 before), and with a
wrong one (below 0.3, 21-25%) 0.19/0.13/0.08, because the model goes where the reference points. JCM does
not recover them (`docs/results.md`).

**Reference swaps make it worse** (`reference-swap`, `augment.reference_swap=0.25`, seeds 0 and 1). Training
with a quarter of the references cut from another round's mask was meant to teach the model to fall back on
the query and the image when a reference does not fit them. It did not learn to tell a wrong reference from
a right one; it learnt to trust every reference less. With the paper's reference rule, chained
reference-only Dice fell from 63.5 and 61.7 to 50.0 and 55.5, teacher-forced from 82.3 and 83.6 to 67.9 and
67.4, leaving a lead of about +2 chained. By the same split: with a good reference (above 0.7) it scored
0.62 and 0.67 instead of 0.77 and 0.83; with a wrong one 0.22 and 0.35 instead of 0.26 and 0.10. The key
stays in the code, off by default, as a measured negative result; seed 2 was stopped once two seeds agreed.
A milder rate trades the same way: at 0.1 (seed 0 only, `mediround train recipes/default-tiny.yaml --cpu
output=runs/reference-swap10-s0 augment.reference_swap=0.1`, 36 min) chained reference-only Dice was 61.6
(63.5 without swaps), teacher-forced 78.4 (82.3), with a good reference 0.71 instead of 0.77 and with a
wrong one 0.32 instead of 0.26.

**Held-out phrasings: NOT reached, by about 22 to 25 points** (reference-only, 82.7 -> 61.0 teacher-forced,
64.1 -> 39.5 chained; named rounds 77.0 -> 53.8). The history-blind model loses as much on named rounds (79.0
-> 49.6). The table by what the query carries says where: rounds whose query names the target ("Segment the
liver." / "Please outline the liver.", 22 rounds) score the same in both wordings (85.4 -> 84.2 chained),
although every held-out template word around the name is new. Rounds that describe the target ("the organ
that pumps blood" / "the organ that sits between the lungs and drives the circulation", 66 rounds) fall
from 74.2 to 43.7, and reference-only rounds, whose relation ("the lesion inside that organ" / "the
abnormality in it") is worded anew, from 82.7 to 61.0 with ground-truth references. So the recipe does not
depend on the template style, and the model does not stumble on unseen words; what it lacks is the meaning
of words it never saw: 185 of the 206 held-out queries hold a token that no training text holds, and no
gradient ever told the model that "drives the circulation" means the heart. A language model trained from
scratch on one half of the wordings cannot know that; a pretrained LLaVA-Med does, and none can be loaded
here (no model hub). Setting the unseen tokens' embeddings to the mean of the seen ones (seed 0, no
retraining) made it worse (teacher-forced reference-only 62.0 -> 32.3). So on this model the held-out test
measures world knowledge of the words, not the reference path.

**Named rounds.** MediRound scores 77.0, the blind model 79.0: each of its sequences holds one round.
"""


if __name__ == "__main__":
    main()

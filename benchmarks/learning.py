"""Learning benchmark of the tiny recipe (issue: train really learns); writes docs/learning.md and PNG curves.

    python benchmarks/learning.py --work ../bench --jcm            # 3 seeds x 3 settings + JCM
    python benchmarks/learning.py --work ../bench --seeds 0 --settings mediround history-blind

Each setting trains ``recipes/default-tiny.yaml`` (the shipped model's recipe; seed 0 of ``mediround`` is
the shipped model's stage 1) with ``mediround train`` on the synthetic benchmark (``mediround synth
data/synth --dialogues 500 --seed 0``), changing only the output folder and the seed (``--steps``
overrides the recipe's step count), and validating teacher-forced on the whole validation split as the
recipe says:

- ``mediround``: the recipe as committed (answer CE 0.2, BCE 2, Dice 2, entity loss 1).
- ``history-blind``: the same recipe and steps on every round as a dialogue of its own without its
  reference (no history text, no crop/box tokens); each step sees as many rounds as a MediRound step.
- ``paper-losses``: MediRound without the entity loss (``model.loss.entity=0``), the paper's objective.

Scores are split by ``names_target``: "named" rounds name their target in the query or answer, "ref-only"
rounds can only be resolved through the referenced round. For every MediRound run the final model is also
scored with each reference replaced by the whole image (crop = image, box = [0, 0, 1, 1]): the drop on
ref-only rounds is what the reference tokens contribute. With ``--jcm``, ``mediround train-jcm`` trains the
JCM of every ``mediround`` run and the judge's Spearman correlation with the true IoU is reported.
Runs whose model folder exists are reused, so an interrupted benchmark continues where it stopped.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic_benchmark import (
    BLIND_BATCH,
    BLIND_DATA_OVERRIDES,
    SYNTH_DIALOGUES,
    SYNTH_SEED,
    markdown_table,
    score_lines,
    write_blind,
)

from mediround.atomic import atomic_open
from mediround.data.formats import load_dialogues
from mediround.metrics import aggregate, counts
from mediround.model import MASK_THRESHOLD, load_sample
from mediround.model.checkpoint import load_checkpoint
from mediround.model.mllm import clip_normalise
from mediround.training.recipe import SHIPPED_RECIPES

REPO = Path(__file__).resolve().parents[1]
RECIPE = SHIPPED_RECIPES / "default-tiny.yaml"
JCM_RECIPE = SHIPPED_RECIPES / "default-tiny-jcm.yaml"
SETTINGS = ("mediround", "history-blind", "paper-losses")
SPLITS = {"all": None, "named": True, "ref-only": False}


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
            overrides = [f"output=runs/{setting}-s{seed}", f"train.seed={seed}", "--resume"]
            if steps is not None:
                overrides.append(f"train.max_steps={steps}")
            if setting == "history-blind":
                overrides += BLIND_DATA_OVERRIDES
            if setting == "paper-losses":
                overrides.append("model.loss.entity=0")
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


@torch.no_grad()
def whole_image_reference_dice(model_folder: Path, val: Path) -> dict[str, float]:
    """Teacher-forced Dice with every reference replaced by the whole image: what is left without it."""
    model = load_checkpoint(model_folder)
    model.eval()
    samples = [load_sample(d) for d in load_dialogues(val).dialogues]
    rows = {name: [] for name in SPLITS}
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
            for index, round_ in enumerate(sample.dialogue.rounds):
                for name, named in SPLITS.items():
                    if named is None or round_.names_target is named:
                        rows[name].append({key: values[index] for key, values in mask_counts.items()})
    return {name: aggregate(split_rows).dice for name, split_rows in rows.items() if split_rows}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Folder for data and runs (outside the repository).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per run [default: the recipe's].")
    parser.add_argument("--parallel", type=int, default=2, help="Runs at a time (one thread each).")
    parser.add_argument("--jcm", action="store_true", help="Also train the JCM of every mediround run.")
    parser.add_argument("--jcm-seeds", type=int, nargs="+", help="Only these seeds' JCM [default: --seeds].")
    parser.add_argument("--paper-losses-seeds", type=int, nargs="+",
                        help="Only these seeds of the paper-losses setting [default: --seeds].")
    parser.add_argument("--docs", type=Path, default=REPO / "docs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = args.work.resolve()
    synth = work / "data" / "synth"
    if not (synth / "train.jsonl").is_file():
        run_all([(["synth", "data/synth", "--dialogues", str(SYNTH_DIALOGUES), "--seed", str(SYNTH_SEED)],
                  work / "synth.log")], work, 1)
    for split in ("train", "val"):
        if not (synth / f"{split}-blind.jsonl").is_file():
            write_blind(synth / f"{split}.jsonl", synth / f"{split}-blind.jsonl")
    (work / "runs").mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs = {setting: (args.paper_losses_seeds or args.seeds) if setting == "paper-losses" else args.seeds
            for setting in args.settings}
    run_all(training_commands(work, runs, args.steps), work, args.parallel)
    jcm_seeds = (args.jcm_seeds or args.seeds) if args.jcm and "mediround" in args.settings else []
    run_all(jcm_commands(work, jcm_seeds), work, args.parallel)

    results: dict[str, list[dict]] = {}
    for setting, seeds in runs.items():
        for seed in seeds:
            run = work / "runs" / f"{setting}-s{seed}"
            entry = {"seed": seed, "curves": curves(run)}
            if setting != "history-blind":
                entry["whole_image"] = whole_image_reference_dice(run / "model", synth / "val.jsonl")
            if setting == "mediround" and seed in jcm_seeds:
                entry["jcm"] = jcm_spearman(work / "runs" / f"jcm-s{seed}")
            results.setdefault(setting, []).append(entry)
    figures = args.docs / "learning"
    figures.mkdir(parents=True, exist_ok=True)
    write_page(results, args, figures, (time.monotonic() - started) / 60)
    print(json.dumps({setting: [{"seed": e["seed"], **{k: e["curves"][k][max(e["curves"][k])] for k in SPLITS}}
                                for e in entries] for setting, entries in results.items()}))


def final(entries: Sequence[dict], split: str) -> list[float]:
    return [e["curves"][split][max(e["curves"][split])] for e in entries]


def targets(results: Mapping[str, list[dict]]) -> str:
    """The issue's three targets, each with the measured number and whether it is reached."""
    lines = ["Targets (teacher-forced, validation split, means over seeds):", ""]
    if "mediround" in results:
        named = 100 * float(np.mean(final(results["mediround"], "named")))
        lines.append(f"- Dice >= 60 on rounds that name their target: {named:.1f} "
                     f"({'reached' if named >= 60 else 'NOT reached'}).")
    if "mediround" in results and "history-blind" in results:
        ours = 100 * float(np.mean(final(results["mediround"], "ref-only")))
        blind = 100 * float(np.mean(final(results["history-blind"], "ref-only")))
        lines.append(f"- MediRound ahead of the history-blind model by >= 10 Dice points on reference-only rounds: "
                     f"{ours:.1f} vs {blind:.1f}, {ours - blind:+.1f} ({'reached' if ours - blind >= 10 else 'NOT reached'}).")
    with_jcm = [e["jcm"]["spearman_teacher-forced"] for e in results.get("mediround", []) if "jcm" in e]
    if with_jcm:
        mean = float(np.mean(with_jcm))
        lines.append(f"- JCM judge vs true IoU, Spearman >= 0.5: {mean:.2f} over {len(with_jcm)} seed(s) "
                     f"({'reached' if mean >= 0.5 else 'NOT reached'}).")
    return "\n".join(lines)


def write_page(results: Mapping[str, list[dict]], args: argparse.Namespace, figures: Path,
               minutes: float) -> None:
    steps = max(max(e["curves"]["all"]) for entries in results.values() for e in entries)
    extra_flags = f" --jcm-seeds {' '.join(map(str, args.jcm_seeds))}" if args.jcm and args.jcm_seeds else ""
    if args.paper_losses_seeds and "paper-losses" in args.settings:
        extra_flags += f" --paper-losses-seeds {' '.join(map(str, args.paper_losses_seeds))}"
    header = ["setting", "seeds", "all", "named", "ref-only", "ref-only, reference replaced by the whole image"]
    rows = []
    for setting, entries in results.items():
        whole = [e["whole_image"]["ref-only"] for e in entries if "whole_image" in e]
        rows.append([setting, str(len(entries)), *(mean_sd(final(entries, s)) for s in SPLITS),
                     mean_sd(whole) if whole else "–"])
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
        spearmans = [e["jcm"] for e in with_jcm]
        jcm = "\n".join(f"- seed {e['seed']}: " + ", ".join(f"{k} {v:.3f}" for k, v in e["jcm"].items())
                        for e in with_jcm)
        jcm = f"JCM judge vs true IoU (Spearman, `mediround train-jcm` with {JCM_RECIPE.name}):\n\n{jcm}\n"
        jcm += f"\nMean over seeds: {np.mean([v for s in spearmans for k, v in s.items() if 'teacher' in k]):.3f} (teacher-forced features)\n"
    page = f"""# Learning benchmark of the tiny recipe

Regenerated by `python benchmarks/learning.py --work DIR --seeds {' '.join(map(str, args.seeds))}{' --jcm' if args.jcm else ''}{extra_flags}`
({minutes:.0f} min of training and scoring on 2 CPU cores, {args.parallel} runs at a time). Recipe:
`recipes/{RECIPE.name}`, {steps} optimizer steps per run; history-blind runs see {BLIND_BATCH} single-round
dialogues per step (as many rounds as a MediRound step). Teacher-forced validation Dice x100 on the
whole validation split at the last step, mean ± standard deviation over seeds.

{markdown_table(header, rows)}

{targets(results)}

![Dice, all rounds](learning/dice-all.png)
![Dice, named rounds](learning/dice-named.png)
![Dice, reference-only rounds](learning/dice-ref-only.png)

{jcm}
## Discussion

{DISCUSSION}"""
    with atomic_open(args.docs / "learning.md") as handle:
        handle.write(page)


DISCUSSION = """Written for the run of 2026-11-28 (second session). The runs were trained beforehand by
the same commands, two or three at a time on the 2 cores: 12 to 21 minutes for a MediRound run, 20 to
30 for a history-blind run (34 images a step instead of 8). If you regenerate this page with other runs, check
that the text still fits the numbers above.

**Rounds that name their target: reached.** MediRound scores 73.8 (seeds 80.8, 69.4, 71.3). The
paper's objective alone (`paper-losses`, no entity loss) stays at 33.4, the level of the average mask:
the [SEG] state never learns which structure is asked for. The history-blind model is better on these
rounds (79.3). Each of its sequences holds one round, so its [SEG] state has one query to read. A
MediRound [SEG] has to find its own round's query in a dialogue of up to 8 rounds, at the same number of
steps.

**Reference-only rounds: MediRound ahead by 6.2 points; the 10-point target is not reached.** By seed
the lead is +9.8, +3.9 and +4.9. What limits it:

- The budget. On reference-only rounds the history-blind curve is flat from step 200 (46, 46, 45 for
  seed 0 at steps 200, 300, 400): without the history it cannot tell which of at least two candidates
  is meant. MediRound is still rising at step 400 (seed 0: 45, 49, 55). A run here is 400 steps (12-21
  minutes). The issue's 60-minute budget would allow about 1,500 steps, but 3 seeds of both models at
  that length were more CPU time than this session had.
- The reference tokens carry little of the lead. Replacing every reference with the whole image (crop
  = the image, box = [0, 0, 1, 1]) costs MediRound only 2.4 points (52.8 -> 50.4). Most of its lead
  comes from the history text: the referenced round's query and answer often describe its entity. The
  crop token is the CLS token of a randomly initialised tiny CLIP, which says little about appearance.
  The box token gives the location, and its Fourier features are what made the reference usable at all
  (`docs/training.md`).

**JCM judge: reached.** The judge of `mediround train-jcm` ranks the raw masks' IoU with Spearman 0.77,
0.79 and 0.69 (seeds 0, 1, 2). On the validation split JCM at beta 0.6 changes chained Dice from 67.5
to 68.4 (seed 0), from 61.0 to 62.5 (seed 1) and from 60.4 to 60.6 (seed 2).
"""


if __name__ == "__main__":
    main()

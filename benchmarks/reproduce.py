"""Small-scale reproduction of the paper's findings with the shipped tiny model; writes docs/results.md.

    python benchmarks/reproduce.py --work ../runs            # evaluate (about 10-20 min on 2 cores)
    python benchmarks/reproduce.py --work ../runs --train    # first train the three models (~1 h)

Everything runs in ``--work`` (outside the repository): the synthetic benchmark of ``benchmarks/learning.py``
(``SYNTH_COMMAND``: MR-MedSeg-style answers, one half of the template wordings), its history-blind copies,
the training runs and the evaluation outputs. The results are written to ``docs/results.md`` and ``docs/results/*.png``.

Compared, all on the same evaluation dialogues (the first ``--eval-dialogues`` dialogues of the synthetic
test split of seed 0, worded as in training, never seen in training):

- (a) history-blind baseline: the same architecture, recipe and number of optimizer steps, trained and
  evaluated on every round as a dialogue of its own with no reference (no history text, no reference
  crop/box tokens). Each step sees as many rounds as a MediRound step (34 rounds = 8 dialogues of 4.2
  rounds on average), so both models get the same supervision; the blind run costs more compute per step
  because every round re-encodes its image. ``--blind-model`` (default WORK/runs/history-blind-s0/model).

The runs are those of seed 0 of ``benchmarks/learning.py`` (same folders, same commands), so one
training serves both scripts.
- (b) MediRound: the shipped model with JCM off, each round's reference from its own earlier prediction.
- (c) MediRound + JCM at beta 0.6 (the shipped model's default).
- TF: (b) with ground-truth reference masks (teacher forcing): the upper bound for chained references.

Every table is split by ``names_target``: rounds whose query or answer names the target (a history-blind
model can solve them) versus rounds that only the referenced round resolves.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from synthetic_benchmark import (
    BLIND_DATA_OVERRIDES,
    BLIND_SUFFIX,
    SYNTH_COMMAND,
    SYNTH_PHRASINGS,
    SYNTH_SEED,
    markdown_table,
    prepare_benchmark,
    score_lines,
    write_blind,
)

from mediround.atomic import atomic_open, write_json
from mediround.data.formats import load_dialogues
from mediround.data.images import load_mask
from mediround.data.predictions import read_predictions
from mediround.data.synth import Wording, generate
from mediround.inference import DEFAULT_BETA
from mediround.inference.model_eval import ModelEvalConfig, ModelEvaluation, evaluate_model
from mediround.inference.settings import InferenceConfig
from mediround.metrics import Scores, aggregate, pair_counts, spearman
from mediround.reports.scoring import EvalConfig
from mediround.training.recipe import SHIPPED_RECIPES, resolve_recipe

REPO = Path(__file__).resolve().parents[1]
STAGE1_RUN, BLIND_RUN, JCM_RUN = "runs/mediround-s0", "runs/history-blind-s0", "runs/jcm-s0"
BLIND_OVERRIDES = (f"output={BLIND_RUN}", *BLIND_DATA_OVERRIDES)
SWEEP_BETAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
PAPER_BETA = DEFAULT_BETA
MAX_ROUND = 8
SPLITS: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    "all rounds": lambda row: True,
    "target named": lambda row: row["names_target"] is True,
    "reference only": lambda row: row["names_target"] is False,
}


def unsplit(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Rows of a history-blind evaluation with their dialogue id and round number restored."""
    restored = []
    for row in rows:
        dialogue_id, number = row["dialogue_id"].rsplit(BLIND_SUFFIX, 1)
        restored.append({**row, "dialogue_id": dialogue_id, "round": int(number)})
    return restored


def mediround(args: Sequence[str], work: Path) -> None:
    """Run a ``mediround`` command in ``work``; stop the script if it fails."""
    command = [sys.executable, "-m", "mediround_cli.main", *args]
    print("$ mediround " + " ".join(args), flush=True)
    if subprocess.run(command, cwd=work, check=False).returncode != 0:
        raise SystemExit(f"failed: mediround {' '.join(args)}")


def prepare_data(work: Path, eval_dialogues: int) -> tuple[Path, Path]:
    """The training benchmark (``prepare_benchmark``), and the evaluation split worded as in training (plus
    its blind copy)."""
    prepare_benchmark(work)
    evaluation = work / "data" / "eval"
    if not (evaluation / "test.jsonl").is_file():
        generate(evaluation, eval_dialogues, SYNTH_SEED, split="test", wording=Wording(phrasings=SYNTH_PHRASINGS))
    return evaluation / "test.jsonl", write_blind(evaluation / "test.jsonl", evaluation / "test-blind.jsonl")


def train(work: Path) -> None:
    """Stage 1 of MediRound and of the blind baseline, then JCM, with the committed recipes."""
    recipe, jcm_recipe = str(SHIPPED_RECIPES / "default-tiny.yaml"), str(SHIPPED_RECIPES / "default-tiny-jcm.yaml")
    mediround(["train", recipe, "--cpu", f"output={STAGE1_RUN}"], work)
    mediround(["train", recipe, "--cpu", *BLIND_OVERRIDES], work)
    mediround(["train-jcm", jcm_recipe, "--cpu", "--model", f"{STAGE1_RUN}/model", f"output={JCM_RUN}"], work)


def run_facts(run: Path) -> dict:
    """Steps, wall minutes and the last validation event of a training run folder."""
    events = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if line.strip()]
    steps = [e for e in events if e["event"] == "step"]
    validations = [e for e in events if e["event"] == "validation"]
    return {"steps": steps[-1]["step"], "wall_minutes": round((events[-1]["time"] - events[0]["time"]) / 60, 1),
            "last_validation": {k: v for k, v in validations[-1].items() if k not in ("event", "time")}
            if validations else None}


def pack(work: Path, target: Path) -> Path:
    """Re-save the trained JCM checkpoint as the package's default model, with TRAINING.json and README.md."""
    import importlib.metadata

    from mediround.model.checkpoint import load_checkpoint, save_checkpoint

    stage1, jcm = work / STAGE1_RUN, work / JCM_RUN
    save_checkpoint(load_checkpoint(jcm / "model"), target)
    recipes = {"stage1": "recipes/default-tiny.yaml", "jcm": "recipes/default-tiny-jcm.yaml"}
    record = {
        "seed": 0,
        "data": SYNTH_COMMAND,
        "commands": [f"mediround train recipes/default-tiny.yaml --cpu output={STAGE1_RUN}",
                     (f"mediround train-jcm recipes/default-tiny-jcm.yaml --cpu --model {STAGE1_RUN}/model "
                      f"output={JCM_RUN}")],
        "software": {name: importlib.metadata.version(name) for name in ("mediround", "torch", "transformers", "peft")},
    }
    for stage, run in (("stage1", stage1), ("jcm", jcm)):
        record[stage] = {"recipe": recipes[stage], "settings": yaml.safe_load(resolve_recipe(recipes[stage]).read_text()),
                         **run_facts(run)}
    record["summary"] = (
        f"Tiny preset trained from scratch on CPU: stage 1 {record['stage1']['steps']} steps of "
        f"{record['stage1']['settings']['train']['batch_size']} dialogues "
        f"({record['stage1']['wall_minutes']} min), JCM {record['jcm']['steps']} steps of 8 dialogues on "
        f"teacher-forced features ({record['jcm']['wall_minutes']} min), 2 shared CPU cores, seed 0.")
    write_json(target / "TRAINING.json", record)
    (target / "README.md").write_text(ASSET_README.format(summary=record["summary"], data=record["data"]))
    return target


def evaluate(data: Path, model: Path, out: Path, betas: Sequence[float | None],
             teacher_forcing: bool = False, resume: bool = False) -> ModelEvaluation:
    """One inference pass over every beta track (one reference source), scored; rows in OUT/rows.parquet.
    ``resume`` keeps the dialogues an interrupted run already predicted (same data, model path and tracks)."""
    config = InferenceConfig(data=str(data), model=str(model), out=str(out), betas=tuple(betas),
                             teacher_forcing=(teacher_forcing,), device="cpu", resume=resume)
    started = time.monotonic()
    result = evaluate_model(ModelEvalConfig(config, EvalConfig(out=out / "rows.parquet")))
    print(f"evaluated {data.name} with {len(result.tracks)} track(s) in {time.monotonic() - started:.0f} s",
          flush=True)
    return result


def prior_rows(train: Path, data: Path) -> list[dict]:
    """Rows of a predictor that ignores image and text: the mean training mask, thresholded where it scores the
    best mean Dice on the training masks. A model at this level has not learned what the query asks for."""
    masks = [load_mask(d.mask_path(n)) for d in load_dialogues(train).dialogues for n in range(1, len(d.rounds) + 1)]
    stack = np.stack(masks)
    mean = stack.mean(axis=0)

    def mean_dice(threshold: float) -> float:
        prediction = mean > threshold
        intersection = (stack & prediction).sum(axis=(1, 2))
        return float(np.mean(2 * intersection / (stack.sum(axis=(1, 2)) + prediction.sum())))

    prediction = mean > max(np.linspace(0.0, mean.max(), 41)[:-1], key=mean_dice)
    rows = []
    for dialogue in load_dialogues(data).dialogues:
        for number, round_ in enumerate(dialogue.rounds, start=1):
            counts = pair_counts(prediction, load_mask(dialogue.mask_path(number)))
            rows.append({"dialogue_id": dialogue.id, "round": number, "names_target": round_.names_target,
                         "difficulty": round_.difficulty or dialogue.difficulty, "intersection": counts.intersection,
                         "union": counts.union, "iou": counts.iou, "dice": counts.dice})
    return rows


def round_overlap(data: Path, predictions: Path) -> tuple[float, float]:
    """Mean IoU between the masks of two different rounds of one dialogue: (predicted, ground truth). A
    model that ignores the query predicts the same mask in every round (predicted overlap near 1)."""
    records = read_predictions(predictions)
    predicted, truth = [], []
    for dialogue in load_dialogues(data).dialogues:
        numbers = range(1, len(dialogue.rounds) + 1)
        masks = {n: load_mask(predictions / records[(dialogue.id, n)]["mask"]) for n in numbers}
        truths = {n: load_mask(dialogue.mask_path(n)) for n in numbers}
        for first in numbers:
            for second in numbers[first:]:
                predicted.append(pair_counts(masks[first], masks[second]).iou)
                truth.append(pair_counts(truths[first], truths[second]).iou)
    return float(np.mean(predicted)), float(np.mean(truth))


def changed_masks(first: Path, second: Path) -> tuple[int, int, int]:
    """(masks, masks that differ, pixels that differ) between two predictions folders of the same data."""
    records = read_predictions(first)
    other = read_predictions(second)
    differing = [int((load_mask(first / r["mask"]) != load_mask(second / other[key]["mask"])).sum())
                 for key, r in records.items()]
    return len(differing), sum(1 for d in differing if d), sum(differing)


def track_rows(result: ModelEvaluation, beta: float | None, teacher_forcing: bool = False) -> list[dict]:
    references = "ground-truth" if teacher_forcing else "predicted"
    return [r for r in result.rows if r["beta"] == beta and r["references"] == references]


def score(rows: Sequence[Mapping[str, Any]], keep: Callable[[Mapping[str, Any]], bool]) -> Scores | None:
    chosen = [r for r in rows if keep(r)]
    return aggregate(chosen) if chosen else None


def cell(scores: Scores | None, metric: str) -> str:
    return "–" if scores is None else f"{scores.points(metric):.1f}"


def overall_tables(methods: Mapping[str, Sequence[dict]]) -> str:
    by_difficulty = []
    by_target = []
    for label, rows in methods.items():
        cells = []
        for difficulty in ("regular", "hard", None):
            scores = score(rows, lambda r, d=difficulty: d is None or r["difficulty"] == d)
            cells += [cell(scores, "giou"), cell(scores, "ciou")]
        by_difficulty.append([label, *cells, cell(score(rows, SPLITS["all rounds"]), "dice")])
        cells = []
        for split in ("target named", "reference only"):
            scores = score(rows, SPLITS[split])
            cells += [cell(scores, m) for m in ("dice", "giou", "ciou")]
        by_target.append([label, *cells])
    first = markdown_table(["method", "regular gIoU", "regular cIoU", "hard gIoU", "hard cIoU", "all gIoU",
                            "all cIoU", "all Dice"], by_difficulty)
    second = markdown_table(["method", "named Dice", "named gIoU", "named cIoU", "ref-only Dice", "ref-only gIoU",
                             "ref-only cIoU"], by_target)
    return first + "\n\n" + second


def round_scores(rows: Sequence[dict], keep: Callable[[Mapping[str, Any]], bool]) -> dict[int, Scores]:
    return {n: s for n in range(1, MAX_ROUND + 1)
            if (s := score(rows, lambda r, n=n: r["round"] == n and keep(r))) is not None}


def round_tables(methods: Mapping[str, Sequence[dict]], figures: Path) -> str:
    parts = []
    for split, keep in SPLITS.items():
        counts = round_scores(next(iter(methods.values())), keep)
        header = ["method", *(f"R{n} (n={counts[n].count})" if n in counts else f"R{n}"
                              for n in range(1, MAX_ROUND + 1))]
        rows, series = [], {}
        for label, method_rows in methods.items():
            per_round = round_scores(method_rows, keep)
            rows.append([label, *(cell(per_round.get(n), "ciou") for n in range(1, MAX_ROUND + 1))])
            series[label] = {float(n): s.points("ciou") for n, s in per_round.items()}
        name = "rounds-" + split.replace(" ", "-") + ".png"
        score_lines(series, figures / name, f"cIoU per round ({split})", "round", lambda x: str(int(x)))
        parts.append(f"**{split}** (cIoU x100; n = masks per round)\n\n" + markdown_table(header, rows)
                     + f"\n\n![cIoU per round, {split}](results/{name})")
    return "\n\n".join(parts)


def beta_section(result: ModelEvaluation, figures: Path) -> tuple[str, dict[float, Scores]]:
    rows, overall, series = [], {}, {"all rounds": {}, "target named": {}, "reference only": {}}
    for beta in (None, *SWEEP_BETAS):
        track = track_rows(result, beta)
        scores = {split: score(track, keep) for split, keep in SPLITS.items()}
        refined = sum(1 for r in track if r.get("refined"))
        rows.append(["off" if beta is None else f"{beta:g}", *(cell(scores["all rounds"], m) for m in
                     ("dice", "giou", "ciou")), cell(scores["target named"], "ciou"),
                     cell(scores["reference only"], "ciou"), f"{refined}/{len(track)}"])
        if beta is not None:
            overall[beta] = scores["all rounds"]
            for split, value in scores.items():
                if value is not None:
                    series[split][beta] = value.points("ciou")
    score_lines(series, figures / "beta.png", "cIoU against the JCM threshold beta", "beta")
    table = markdown_table(["beta", "Dice", "gIoU", "cIoU", "named cIoU", "ref-only cIoU", "refined"], rows)
    return table + "\n\n![cIoU against beta](results/beta.png)", overall


def jcm_diagnostics(result: ModelEvaluation) -> str:
    raw, refined = track_rows(result, 0.0), track_rows(result, 1.0)
    judged = [r for r in raw if r.get("jcm_score") is not None]
    at_paper_beta = track_rows(result, PAPER_BETA)
    refined_count = sum(1 for r in at_paper_beta if r["refined"])
    lines = [f"- Rounds refined at beta {PAPER_BETA:g}: {refined_count} of {len(at_paper_beta)}."]
    if judged:
        rho = spearman([r["jcm_score"] for r in judged], [r["iou"] for r in judged])
        lines.append(f"- Judge: Spearman rank correlation of the judge score with the IoU of the raw mask, over "
                     f"{len(judged)} rounds (beta 0 track, references from raw masks): {rho:.2f}.")
    for split in ("target named", "reference only"):
        before, after = score(raw, SPLITS[split]), score(refined, SPLITS[split])
        if before is not None and after is not None:
            lines.append(f"- Refine, {split}: cIoU {cell(before, 'ciou')} with every raw [SEG] (beta 0) vs "
                         f"{cell(after, 'ciou')} with every [SEG] refined (beta 1); Dice {cell(before, 'dice')} "
                         f"vs {cell(after, 'dice')}.")
    return "\n".join(lines)


def single_round_table(methods: Mapping[str, Sequence[dict]], real: Mapping[str, Sequence[dict]]) -> str:
    rows = []
    for label, method_rows in methods.items():
        first = score(method_rows, lambda r: r["round"] == 1)
        rows.append([label, "synthetic test, round 1", str(first.count),
                     *(cell(first, m) for m in ("dice", "giou", "ciou"))])
    for label, real_rows in real.items():
        scores = score(real_rows, SPLITS["all rounds"])
        rows.append([label, "SA-Med2D demo slices", str(scores.count), *(cell(scores, m) for m in ("dice", "giou", "ciou"))])
    return markdown_table(["method", "data", "masks", "Dice", "gIoU", "cIoU"], rows)


def shape_checks(methods: Mapping[str, Sequence[dict]], beta_overall: Mapping[float, Scores]) -> str:
    """The paper's claims, each checked on these numbers; the prior says whether a win means anything."""
    blind, plain, jcm = (methods[k] for k in list(methods)[:3])
    prior = next(rows for label, rows in methods.items() if label.startswith("prior"))
    lines = []
    a, b, p = (score(rows, SPLITS["reference only"]) for rows in (blind, plain, prior))
    verdict = "yes" if b.ciou > a.ciou else "NO"
    caveat = (f"; but the prior scores {cell(p, 'ciou')} on these rounds, so neither model resolves the reference "
              "and the difference is not evidence of using the history") if max(a.ciou, b.ciou) <= p.ciou + 0.01 else ""
    lines.append(f"- (b) beats (a) on reference-only rounds (cIoU): {verdict} ({cell(b, 'ciou')} vs {cell(a, 'ciou')})"
                 f"{caveat}.")
    b_all, c_all = score(plain, SPLITS["all rounds"]), score(jcm, SPLITS["all rounds"])
    lines.append(f"- (c) >= (b) overall (cIoU): {'yes' if c_all.ciou >= b_all.ciou else 'NO'} "
                 f"({cell(c_all, 'ciou')} vs {cell(b_all, 'ciou')}).")
    per_b, per_c = round_scores(plain, SPLITS["all rounds"]), round_scores(jcm, SPLITS["all rounds"])
    gains = {n: per_c[n].points("ciou") - per_b[n].points("ciou") for n in per_b if n in per_c}
    listed = ", ".join(f"R{n} {g:+.1f}" for n, g in gains.items())
    if all(g < 0 for g in gains.values()):
        lines.append(f"- JCM gain grows with the round index: NO, JCM lowers cIoU in every round ({listed}).")
    else:
        trend = spearman(list(gains), list(gains.values())) if len(gains) > 2 else float("nan")
        lines.append(f"- JCM gain grows with the round index: {'yes' if trend > 0 else 'NO'} ({listed}; rank "
                     f"correlation with the round index {trend:.2f}).")
    # A peak is a point inside (0, 1) above both ends as printed: a curve level with beta 0 is flat, not peaked.
    points = {beta: round(scores.points("ciou"), 1) for beta, scores in beta_overall.items()}
    best = max((beta for beta in points if 0.0 < beta < 1.0), key=points.get)
    inside = points[best] > max(points[0.0], points[1.0])
    lines.append(f"- The beta curve peaks inside (0, 1): {'yes' if inside else 'NO'} (overall cIoU: best inside at "
                 f"beta {best:g} {points[best]:.1f}; beta 0 {points[0.0]:.1f}; beta 1 {points[1.0]:.1f}).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="Folder for data, runs and evaluation outputs.")
    parser.add_argument("--train", action="store_true", help="Train the three models first (committed recipes).")
    parser.add_argument("--pack", action="store_true",
                        help=f"Copy the trained WORK/{JCM_RUN} model into mediround/assets/default-model.")
    parser.add_argument("--model", type=Path, help="MediRound + JCM checkpoint [default: the shipped model].")
    parser.add_argument("--blind-model", type=Path,
                        help=f"History-blind checkpoint [default: WORK/{BLIND_RUN}/model].")
    parser.add_argument("--resume", action="store_true",
                        help="Keep predictions of an interrupted run in WORK/reproduce (same models and data).")
    parser.add_argument("--eval-dialogues", type=int, default=60, help="Synthetic test dialogues to evaluate on.")
    parser.add_argument("--real", type=Path, default=REPO.parent / "shared" / "data" / "sam-med2d-demo" / "data_demo",
                        help="SA-Med2D folder for the single-round table (skipped when missing).")
    parser.add_argument("--docs", type=Path, default=REPO / "docs", help="Where results.md and results/ go.")
    args = parser.parse_args()
    from mediround.default_model import default_checkpoint, training_record

    # One thread: on 2 cores shared with other jobs, two threads per process made steps up to 10x slower.
    torch.set_num_threads(1)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data, blind_data = prepare_data(work, args.eval_dialogues)
    if args.train:
        train(work)
    if args.pack:
        pack(work, REPO / "mediround" / "assets" / "default-model")
    model = args.model or default_checkpoint()
    blind_model = args.blind_model or work / BLIND_RUN / "model"
    out = work / "reproduce"
    main_eval = evaluate(data, model, out / "mediround", (None, *SWEEP_BETAS), resume=args.resume)
    tf_eval = evaluate(data, model, out / "teacher-forced", (None,), teacher_forcing=True, resume=args.resume)
    blind_eval = evaluate(blind_data, blind_model, out / "blind", (None,), resume=args.resume)
    methods = {
        "(a) history-blind": unsplit(track_rows(blind_eval, None)),
        "(b) MediRound": track_rows(main_eval, None),
        f"(c) MediRound + JCM (beta {PAPER_BETA:g})": track_rows(main_eval, PAPER_BETA),
        "TF: (b) with ground-truth references": track_rows(tf_eval, None, teacher_forcing=True),
        "prior: mean training mask": prior_rows(work / "data" / "synth" / "train.jsonl", data),
    }
    real = {}
    if args.real.exists():
        real_eval = evaluate(args.real, model, out / "sa-med2d", (None, PAPER_BETA), resume=args.resume)
        real = {"(b) MediRound": track_rows(real_eval, None),
                f"(c) MediRound + JCM (beta {PAPER_BETA:g})": track_rows(real_eval, PAPER_BETA)}
    figures = args.docs / "results"
    figures.mkdir(parents=True, exist_ok=True)
    beta_table, beta_overall = beta_section(main_eval, figures)
    record = training_record(model) if (Path(model) / "TRAINING.json").is_file() else {}
    loaded = load_dialogues(data).dialogues
    n_rounds = sum(len(d.rounds) for d in loaded)
    n_reference_only = sum(1 for d in loaded for r in d.rounds if r.names_target is False)
    context = {
        "model": str(args.model or "mediround/assets/default-model (the shipped model)"),
        "blind_model": str(args.blind_model or f"WORK/{BLIND_RUN}/model"),
        "data": f"{len(loaded)} dialogues, {n_rounds} rounds ({n_reference_only} reference-only) of the synthetic "
                f"test split (seed {SYNTH_SEED})",
        "minutes": f"{(time.monotonic() - started) / 60:.0f} minutes of evaluation"
                   + (" (predictions of an earlier run reused with --resume)" if args.resume else ""),
        "training": record.get("summary", ""),
        "blind_overrides": " ".join(BLIND_OVERRIDES),
    }
    page = RESULTS_TEMPLATE.format(
        **context,
        table1=overall_tables({k: v for k, v in methods.items() if not k.startswith("TF")}),
        table2=round_tables(methods, figures),
        beta_table=beta_table,
        jcm=jcm_diagnostics(main_eval),
        table3=single_round_table({k: v for k, v in methods.items() if not k.startswith("TF")}, real),
        checks=shape_checks(methods, beta_overall),
        overlap="(predicted {:.2f}, ground truth {:.2f})".format(*round_overlap(data, out / "mediround" / "jcm-off")),
        tf_changes="{} masks, {} differ, by {} pixels in all".format(
            *changed_masks(out / "mediround" / "jcm-off", out / "teacher-forced")),
        discussion=DISCUSSION,
    )
    with atomic_open(args.docs / "results.md") as handle:
        handle.write(page)
    print(json.dumps({"results": str(args.docs / "results.md"), "minutes": context["minutes"]}))


RESULTS_TEMPLATE = """# Results: the paper's findings at small scale

Regenerated by `python benchmarks/reproduce.py --work DIR` (add `--train` to retrain the three models
with the committed recipes first). This run: {minutes} on 2 shared CPU cores.

- MediRound + JCM: {model}. {training}
- History-blind baseline (a): {blind_model}: `recipes/default-tiny.yaml` with
  `{blind_overrides}`: the same architecture, recipe and optimizer steps, every round a dialogue of its
  own without reference (no history text, no reference crop/box tokens), 34 rounds per step (as many as
  8 MediRound dialogues hold on average).
- Evaluation data: {data}, never seen in training. Metrics x100: Dice and gIoU are means over masks,
  cIoU is total intersection over total union (`mediround.metrics`).
- **One training seed per model** (seed 0) on this page; `docs/learning.md` compares MediRound with the
  history-blind baseline over 3 seeds (test split, chained and teacher-forced, in-style and held-out
  wordings), so read differences of a few points here with that spread in mind.
- Every table is split by `names_target`: "named" rounds are solvable from their own query and the image
  (a history-blind model can solve them); "ref-only" rounds can only be resolved through the round they
  refer to. In this benchmark's MR-MedSeg style no answer names its target and no reference-only round
  can be resolved from the dialogue's text alone.

## Shape checks against the paper

{checks}

Does the prediction follow the query? Mean IoU between the masks of two different rounds of one
dialogue, (b) MediRound vs the ground truth: {overlap}. Near 1 for the predictions means the model
draws about the same mask whatever it is asked.

## Table 1 analogue: overall scores

"prior" ignores image and text: the mean training mask, thresholded for the best mean Dice on the
training masks. A model at the prior's level has not learned what the query asks for.

{table1}

## Table 2 analogue: cIoU per round

(a), (b), (c) chain the model's own masks (Algorithm 1); TF feeds the ground-truth mask of the
referred round (teacher forcing), the upper bound of what better references could give. Masks of (b)
against TF: {tf_changes}.

{table2}

## Figure 7 analogue: the JCM threshold beta

A round's raw [SEG] is decoded when the judge's score q > beta, otherwise the refined [SEG] (beta 0:
almost always raw; beta 1: always refined). "off" is (b).

{beta_table}

JCM diagnostics:

{jcm}

## Table 3 analogue: single-round referring segmentation

Round 1 of every synthetic dialogue (no reference, the target is named or uniquely described), and the
real SA-Med2D demo slices (`../shared/data/sam-med2d-demo` beside the repository, one round per mask, CT/MRI) for the
model with and without JCM. The tiny model has only seen synthetic slices: the real-slice row is an
out-of-distribution check, not a benchmark.

{table3}

## Discussion

{discussion}
"""

DISCUSSION = """Written for the run of 2026-12-01 (sixth session): the shipped model is seed 0 of
`docs/learning.md` (1,500 steps of `recipes/default-tiny.yaml` on the MR-MedSeg-style benchmark, one half of
the template wordings, stray fragments left out of references), the blind baseline its history-blind seed 0;
60 test dialogues worded like the training data. If you regenerate this page with other models, check that
it still fits the numbers above.

**Both models learned the task.** Overall cIoU is 65.5 for (b) and 55.1 for (a), against 19.9 for the
prior that ignores image and text. The predictions follow the query: two rounds of one dialogue overlap by
a mean IoU of 0.13, close to the 0.10 of their ground truths.

**(b) beats (a) where the reference is needed.** On reference-only rounds (b) leads (a) by 13.2 Dice and
16.4 cIoU (66.6 vs 53.4 Dice). On hard dialogues, the chains, (b) leads by 22.1 cIoU (51.7 vs 29.6): the
blind model cannot follow a chain at all. On rounds that name their target, (a) is 1.5 Dice ahead (79.4 vs
77.9): its sequences hold one round each. What (b) loses is lost to chained references: with ground-truth
references (TF) reference-only cIoU is 60.1 to 84.0 per round, against 42.4 to 66.3 chained. Round 2, which
always refers to round 1, scores 66.3 chained against 76.5 with the ground-truth reference; with the paper's
reference rule (every pixel of the predicted mask in the crop and box) it scored 49.7, because stray pixels
of a good round-1 mask stretched the box elsewhere (`heads.reference_min_fragment`, `docs/model.md`). What is
left is mostly a wrong round-1 entity, which the model then follows (`docs/learning.md`).

**JCM at beta 0.6 changes nothing, and the beta curve does not peak inside (0, 1): it is flat at 65.5 cIoU
from beta 0 to 0.8 and falls to 63.9 at beta 1, where every round is refined.** The judge was trained, as in
the paper, on teacher-forced features, and stage 1 has converged (teacher-forced validation Dice 0.79 to
0.81 over its last 750 steps): nearly every teacher-forced mask is good, so the judge learned to trust, and
it scores 245 of the 248 chained masks above 0.8 (the lowest 0.67). Its ranking of them is weak (Spearman
0.40 with their IoU). Refining every round no longer helps either: with the cleaner references the refine
MLP lowers reference-only cIoU from 60.1 to 57.7 (named 75.0 to 74.7). A judge trained on rollout features
(seed 0, `mediround train-jcm recipes/default-tiny-jcm.yaml --cpu --rollout --model runs/mediround-s0/model`,
6 minutes) ranks a little better (Spearman 0.46 on these rounds) but still scores nearly everything high: at
beta 0.8 it refines 4 rounds and overall cIoU is 65.6, at beta 0 65.5 and at beta 1 64.6. Its curve's peak
inside (0, 1) is 0.1 point, within noise. On this converged tiny model, JCM has little to correct: the
wrong chained masks are right-looking masks of the wrong entity, which neither MLP can see from the [SEG]
feature.

**Single-round referring (Table 3 analogue).** On round 1 (b) scores 76.6 Dice against 75.9 for (a). On
the real SA-Med2D CT/MRI slices the synthetic-only model scores near zero (Dice 1.5), as expected of a
model that has never seen a real image.
"""

ASSET_README = """# The shipped default model

A tiny MediRound with a trained JCM, used by `mediround infer`, `mediround eval` and `mediround demo`
when no `--model` is given. It exists for trying the tool and for tests: it was trained from scratch
on synthetic slices (`mediround synth`), 5.7 M parameters, with every weight built from the tiny
preset's config (no pretrained LLaVA or SAM). **Not for clinical or research use**; it knows nothing
about real images. Its scores are in `docs/results.md`.

{summary}

Retrain it (from any empty folder; the recipes ship with the package: `mediround recipes`):

```
{data}
mediround train recipes/default-tiny.yaml --cpu
mediround train-jcm recipes/default-tiny-jcm.yaml --cpu
```

or `python benchmarks/reproduce.py --work DIR --train --pack`, which also re-saves the result here.
`TRAINING.json` holds the recipes' settings, the seed, steps, wall time, last validation scores and the
library versions. The real model (LLaVA-Med 7B + MedSAM) is trained as in `docs/real-weights.md`.
"""


if __name__ == "__main__":
    main()

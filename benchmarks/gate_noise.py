"""The two rules of the eval gate on the shipped model (the measured examples of docs/ci.md).

1. Noise: the shipped model on the synthetic test split of several seeds (other dialogues under the same
   ids), each seed compared with the first as if it were a new run against a baseline. No change to the
   model, so every failing score is a false alarm.
2. A planted regression: the first seed's predictions with every mask of one modality shifted by a few
   pixels (a preprocessing bug that hits one scanner type), compared with the original predictions.

For each comparison it prints how many scores each rule fails (default scopes overall,round; and all
scopes with a minimum group size) and the overall Dice drop with its interval. Coverage is left aside
for the noise rows: the seeds' dialogues share ids but not their number of rounds.

    python benchmarks/gate_noise.py --dialogues 100 --seeds 11,12,13,14 --out /tmp/gate-noise
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from mediround.data.formats import load_dialogues
from mediround.data.images import load_mask, save_mask
from mediround.data.predictions import read_predictions
from mediround.data.synth import generate
from mediround.reports.gate import GateSettings, check_scores
from mediround.reports.rows import read_rows
from mediround.reports.scoring import EvalConfig, evaluate_predictions

ALL_SCOPES = ("overall", "round", "modality", "scenario")


def predict(out: Path, dialogues: int, seed: int) -> tuple[Path, Path]:
    """The synthetic test split of ``seed`` and the shipped model's predictions folder on it."""
    data = generate(out / f"data-{seed}", dialogues, seed, split="test").files["test"]
    predictions = out / f"predictions-{seed}"
    if not (predictions / "metrics.parquet").exists():
        subprocess.run(["mediround", "infer", str(data), "--cpu", "--out", str(predictions), "--overwrite"],
                       check=True, stdout=subprocess.DEVNULL)
    return data, predictions


def shifted_copy(data: Path, predictions: Path, modality: str, pixels: int, out: Path) -> list[dict]:
    """Metric rows of ``predictions`` with every mask of ``modality`` shifted down by ``pixels``."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(predictions, out)
    dialogues = load_dialogues(data).dialogues
    hit = {d.id for d in dialogues if d.modality == modality}
    for (dialogue_id, _), record in read_predictions(out).items():
        if dialogue_id in hit:
            path = out / record["mask"]
            save_mask(path, np.roll(load_mask(path), pixels, axis=0))
    return evaluate_predictions(dialogues, out, EvalConfig()).rows


def verdicts(current: list[dict], baseline: list[dict], max_drop: float, min_group_size: int) -> str:
    """Failing scores under each rule and scope set, the overall Dice drop with its 95% interval, and the
    groups the bootstrap fails with all scopes."""
    cells = []
    for scopes in (("overall", "round"), ALL_SCOPES):
        for confidence in (None, 0.95):
            settings = GateSettings(max_drop=max_drop, confidence=confidence, scopes=scopes,
                                    min_group_size=min_group_size if scopes == ALL_SCOPES else 1)
            failed = [c for c in check_scores(current, baseline, settings) if c.failed]
            cells.append(f"{len(failed):3d}")
    overall = next(c for c in check_scores(current, baseline, GateSettings(confidence=0.95, scopes=("overall",)))
                   if c.metric == "dice")
    low, high = overall.interval
    groups = sorted({c.scope for c in check_scores(current, baseline, settings) if c.failed})
    return " | ".join(cells) + f" | {overall.drop:+6.2f} ({low:+.2f} to {high:+.2f}) | {', '.join(groups) or '-'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=100)
    parser.add_argument("--seeds", default="11,12,13,14")
    parser.add_argument("--max-drop", type=float, default=1.0)
    parser.add_argument("--min-group-size", type=int, default=10)
    parser.add_argument("--modality", default="CT", help="The modality whose masks the planted regression shifts.")
    parser.add_argument("--shift", type=int, default=3, help="Pixels of the planted shift.")
    parser.add_argument("--out", type=Path, default=Path("/tmp/gate-noise"))
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    runs = {seed: predict(args.out, args.dialogues, seed) for seed in seeds}
    rows = {seed: read_rows(predictions / "metrics.parquet") for seed, (_, predictions) in runs.items()}

    print(f"{args.dialogues} dialogues per seed; --max-drop {args.max_drop:g}; all scopes with --min-group-size "
          f"{args.min_group_size}. Columns: failing scores with the plain rule and with --confidence 0.95, "
          "first for overall,round then for all scopes; overall Dice drop (95% interval).")
    print("comparison | plain | bootstrap | plain, all scopes | bootstrap, all scopes | overall Dice drop "
          "| groups the bootstrap fails (all scopes)")
    first = seeds[0]
    for seed in seeds[1:]:
        print(f"seed {seed} vs seed {first} (noise) | "
              + verdicts(rows[seed], rows[first], args.max_drop, args.min_group_size))
    data, predictions = runs[first]
    shifted = shifted_copy(data, predictions, args.modality, args.shift, args.out / "shifted")
    print(f"seed {first}, {args.modality} masks shifted {args.shift} px | "
          + verdicts(shifted, rows[first], args.max_drop, args.min_group_size))
    modality = GateSettings(max_drop=args.max_drop, confidence=0.95, scopes=("modality",))
    for check in check_scores(shifted, rows[first], modality):
        if check.metric == "dice":
            print(f"  {check.scope}: {check.dialogues} dialogues, Dice drop {check.drop:+.2f} "
                  f"({check.interval[0]:+.2f} to {check.interval[1]:+.2f}) {check.verdict}")
    started = time.perf_counter()
    check_scores(rows[seeds[1]], rows[first], GateSettings(confidence=0.95, scopes=ALL_SCOPES))
    print(f"bootstrap of every score of all scopes: {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()

"""Teacher-forced versus rollout JCM, trained from the same frozen tiny MediRound.

The paper trains JCM on teacher-forced [SEG] features (references built from ground-truth masks); at
inference the features come from rounds whose references are the model's own masks. This trains JCM
twice with ``run_jcm_training`` (identical recipe but ``jcm.rollout``) and prints, on the validation
split: the judge's Spearman correlation with the true IoU of the raw mask (on rollout and on
teacher-forced features) and the chained Dice/gIoU/cIoU with JCM at beta versus JCM off. It also prints
how much faster a step is once the features of its dialogues are cached (epoch >= 1 versus epoch 0).

    python benchmarks/jcm_rollout.py --model runs/tiny-cpu/model --data data/synth
    python benchmarks/jcm_rollout.py --stage1-step runs/tiny-cpu/checkpoints/step-00001500 --data data/synth
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from mediround.inference import DEFAULT_BETA


def checkpoint_from_stage1_step(step_folder: Path, out: Path) -> Path:
    """A MediRound checkpoint folder from a stage-1 step folder (its run's recipe + trainable weights).

    Every saved tensor is copied by name; parameters the step did not save keep their built values,
    which are the run's own (the build is seeded), so a step folder written before a trainability
    change still loads."""
    import torch
    from safetensors.torch import load_file

    from mediround.model import build_model
    from mediround.model.checkpoint import save_checkpoint
    from mediround.training.checkpointing import TRAINABLE
    from mediround.training.recipe import recipe_from_dict

    run = json.loads((step_folder.parent.parent / "run.json").read_text(encoding="utf-8"))
    model = build_model(recipe_from_dict(run["recipe"]).model)
    saved = load_file(str(step_folder / TRAINABLE))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise SystemExit(f"{step_folder}: weights the model does not have (e.g. {unknown[:3]})")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return save_checkpoint(model, out)


def run_variant(args: argparse.Namespace, model: Path, rollout: bool) -> dict:
    from mediround.training.logging import read_events
    from mediround.training.recipe import load_jcm_recipe
    from mediround.training.stage2 import run_jcm_training

    name = "rollout" if rollout else "teacher-forced"
    recipe = {
        "output": str(args.out / name),
        "model": str(model),
        "data": {"train": str(args.data / "train.jsonl"), "val": str(args.data / "val.jsonl")},
        "train": {"seed": args.seed, "batch_size": args.batch_size, "max_steps": args.steps, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 20), "threads": args.threads, "mixed_precision": "no"},
        "jcm": {"rollout": rollout, "beta": args.beta},
        "validation": {"every": 0, "at_start": False, "max_dialogues": args.val_dialogues},
        "checkpoint": {"every": 0, "keep_last": 1},
        "log": {"every": 1},
    }
    path = args.out / f"{name}.yaml"
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    started = time.perf_counter()
    result = run_jcm_training(load_jcm_recipe(path), cpu=True)
    steps = [e for e in read_events(args.out / name / "train_log.jsonl") if e["event"] == "step"]
    first_epoch = [e["samples_per_s"] for e in steps if e["epoch"] == 0]
    cached = [e["samples_per_s"] for e in steps if e["epoch"] >= 1]
    return {
        "variant": name,
        "seconds": time.perf_counter() - started,
        "judge_loss_first_last": (result.first_step.components["judge"], result.last_step.components["judge"]),
        "samples_per_s_epoch0": float(np.median(first_epoch)) if first_epoch else None,
        "samples_per_s_cached": float(np.median(cached)) if cached else None,
        **result.validations[-1].record(),
    }


def feature_shift(model_folder: Path, val_file: Path, limit: int) -> dict:
    """How far rollout features are from teacher-forced ones on referring rounds: relative L2 distance of
    the [SEG] features and mean absolute difference of their raw masks' IoU with the ground truth."""
    import torch

    from mediround.data.formats import load_dialogues
    from mediround.model import load_sample
    from mediround.model.checkpoint import load_checkpoint
    from mediround.training.jcm_data import ROLLOUT, TEACHER_FORCED, collect_features

    model = load_checkpoint(model_folder).eval()
    distances, iou_gaps, referring = [], [], 0
    for dialogue in load_dialogues(val_file).dialogues[:limit]:
        entry = collect_features(model, [load_sample(dialogue)], [TEACHER_FORCED, ROLLOUT])[0]
        kept = [r for r in dialogue.rounds if r.mask is not None]
        for index, round_ in enumerate(kept):
            if round_.ref is None:
                continue
            referring += 1
            forced, rolled = entry.features[TEACHER_FORCED][index], entry.features[ROLLOUT][index]
            distances.append(float(torch.linalg.norm(rolled - forced) / torch.linalg.norm(forced)))
            iou_gaps.append(abs(float(entry.iou[ROLLOUT][index] - entry.iou[TEACHER_FORCED][index])))
    return {"referring_rounds": referring, "relative_l2": float(np.mean(distances)),
            "iou_gap": float(np.mean(iou_gaps)), "iou_changed": float(np.mean(np.array(iou_gaps) > 0.01))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="A MediRound checkpoint folder (stage 1).")
    source.add_argument("--stage1-step", type=Path, help="A stage-1 run's checkpoints/step-N folder.")
    parser.add_argument("--data", type=Path, required=True, help="Folder with train.jsonl and val.jsonl.")
    parser.add_argument("--out", type=Path, default=Path("runs/jcm-rollout-benchmark"))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--beta", type=float, default=DEFAULT_BETA)
    parser.add_argument("--val-dialogues", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = args.model or checkpoint_from_stage1_step(args.stage1_step, args.out / "stage1-model")
    shift = feature_shift(model, args.data / "val.jsonl", args.val_dialogues)
    results = [run_variant(args, model, rollout) for rollout in (False, True)]
    print(f"frozen model {model}; {args.steps} steps x {args.batch_size} dialogues; "
          f"validation: first {args.val_dialogues} dialogues of {args.data / 'val.jsonl'}; beta {args.beta:g}")
    header = (f"{'JCM trained on':<16}{'Spearman(rollout)':>18}{'Spearman(TF)':>14}{'Dice off':>10}"
              f"{'Dice JCM':>10}{'cIoU off':>10}{'cIoU JCM':>10}{'refined':>9}{'judge loss':>16}")
    print(header)
    for row in results:
        first, last = row["judge_loss_first_last"]
        print(f"{row['variant']:<16}{row['spearman_rollout']:>18.3f}{row['spearman_teacher-forced']:>14.3f}"
              f"{row['off_dice']:>10.4f}{row['jcm_dice']:>10.4f}{row['off_ciou']:>10.4f}{row['jcm_ciou']:>10.4f}"
              f"{row['refined_share']:>9.0%}{first:>8.3f}->{last:.3f}")
    for row in results:
        if row["samples_per_s_epoch0"] and row["samples_per_s_cached"]:
            print(f"{row['variant']}: {row['samples_per_s_cached'] / row['samples_per_s_epoch0']:.1f}x more "
                  f"dialogues/s once features are cached ({row['samples_per_s_epoch0']:.2f} -> "
                  f"{row['samples_per_s_cached']:.2f}); run took {row['seconds']:.0f} s")
    print(f"referring rounds ({shift['referring_rounds']}): rollout vs teacher-forced [SEG] features differ by "
          f"{shift['relative_l2']:.3f} (relative L2); raw-mask IoU differs by {shift['iou_gap']:.4f} on average, "
          f"by more than 0.01 in {shift['iou_changed']:.0%} of them")
    (args.out / "results.json").write_text(json.dumps({"shift": shift, "variants": results}, indent=2),
                                           encoding="utf-8")


if __name__ == "__main__":
    main()

"""The full-size model, once, on CPU: 7B LLaVA (bf16) + ViT-B SAM at 1024 px with random weights.

Run by hand, never in CI (docs/model.md, "Full-size smoke run on CPU")::

    python benchmarks/full_size_smoke.py --out runs/full-size-smoke                # 7B, every stage
    python benchmarks/full_size_smoke.py --size tiny --out runs/full-size-smoke-tiny  # same code, tiny

Nothing is downloaded: the ``llava-med-7b`` preset reads a weightless stand-in folder
(``mediround.model.stand_in``: the real config.json layout, a 32,000-entry tokenizer, an empty weight
file) through the same ``from_pretrained`` path as the real folder, which builds in bf16 and leaves every
weight at random initialisation; SAM ViT-B is built from config. ``--size tiny`` runs the same code on a
tiny layout of the same kind (vocabulary 32,000, bf16, SAM at 128 px). Each stage runs in its own
process, watched from here: one that passes ``--max-rss-gib`` or the time budget is stopped and named;
a stage whose language-model compute alone is projected (from a measured bf16 matmul rate) to take
longer than the time left is skipped with that projection, after its build was measured.

- ``infer``: the default ``llava-med-7b`` preset; ``mediround infer``'s runner on one 3-round dialogue
  (one referring round) of a 1024 px CT slice from ../shared/data, KV-cached and ``--no-cache``; the
  masks must be identical and at the image's size.
- ``train-24gb`` / ``train-4gpu``: one stage-1 optimizer step (one dialogue, batch 1, no accumulation)
  through the training engine with the model section of recipes/mediround-7b-24gb.yaml (new-token rows
  trained) or recipes/mediround-7b-4gpu.yaml (whole embed_tokens/lm_head trained); LoRA and gradient
  checkpointing on. Counts the trainable parameters that received a gradient and that the step changed,
  checks that no frozen weight changed, and sets doctor's memory estimate beside the measured peak.

Printed and written to OUT/full_size_smoke.json: peak RSS and seconds per stage and phase, the counts,
the estimate, torch/transformers versions, the machine and the load average.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mediround.atomic import write_json
from mediround.data.dialogue import Dialogue, Round
from mediround.data.formats import load_dialogues, write_jsonl
from mediround.data.images import load_image, load_mask
from mediround.data.predictions import read_predictions
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig
from mediround.model import build_model, preset, trainable_parameters
from mediround.model.memory import GIB, estimate_training_memory
from mediround.model.stand_in import llava_med_v15_config, write_stand_in_folder
from mediround.training.engine import run_stage
from mediround.training.events import StepLogged
from mediround.training.recipe import load_recipe
from mediround.training.stage1 import TeacherForcing

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "biomedparse-demo"
STAGES = ("infer", "train-24gb", "train-4gpu")
RECIPES = {"train-24gb": REPO / "recipes" / "mediround-7b-24gb.yaml",
           "train-4gpu": REPO / "recipes" / "mediround-7b-4gpu.yaml"}
DOCS_TRAINABLE = {"full": 287_352_800, "rows": 25_208_800}
"""Trainable parameters of the 7B model per ``trainable.token_embeddings`` (docs/model.md)."""
SLICE = "demo/06_CT_abdomen.png"
ROUNDS = (
    Round("Segment the kidneys in this CT slice.", "It is the kidney [SEG].", "demo_mask/06_CT_abdomen_kidney.png"),
    Round("Segment the left one of those.", "It is the left kidney [SEG].",
          "demo_mask/06_CT_abdomen_left+kidney.png", ref=1),
    Round("Now segment the liver.", "It is the liver [SEG].", "demo_mask/06_CT_abdomen_liver.png"),
)
TINY_SAM = {"variant": "tiny", "image_size": 128, "decoder_mlp_dim": 512}
"""The tiny preset's SAM (``--size tiny``)."""
TRAIN_OVERRIDES = ["model.segmenter.checkpoint=null", "model.gradient_checkpointing=true", "data.val=null",
                   "train.batch_size=1", "train.grad_accum=1", "train.max_steps=1", "train.num_workers=0"]
"""One optimizer step on one dialogue with the recipe's model section; no data-loader workers, whose fork
of a 15 GB process would blur the RSS reading."""
POLL_S = 0.2


class StageSkipped(Exception):
    """The stage's projected compute does not fit the time left."""


def tiny_llava_layout(text_layers: int):
    """A tiny LLaVA of the 7B's kind: CLIP 112 px / patch 14 (64 image tokens), Mistral width 128,
    vocabulary 32,000 (the stand-in tokenizer's)."""
    config = llava_med_v15_config(text_layers)
    config.vision_config.update({"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                                 "num_attention_heads": 4, "image_size": 112, "projection_dim": 64})
    config.text_config.update({"hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 4096})
    config.image_seq_length = 64
    return config


def rss_gib(field: str = "VmRSS", pid: int | str = "self") -> float:
    """A memory line of /proc/PID/status in GiB (VmRSS: now; VmHWM: the peak so far); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return 0.0


def matmul_flops_per_s(threads: int) -> float:
    """This CPU's bf16 matmul rate at the 7B's width (what the language model spends its time on)."""
    torch.set_num_threads(threads)
    weight = torch.randn(4096, 4096, dtype=torch.bfloat16)
    tokens = torch.randn(256, 4096, dtype=torch.bfloat16)
    F.linear(tokens, weight)
    start, repeats = time.perf_counter(), 4
    for _ in range(repeats):
        F.linear(tokens, weight)
    return repeats * 2 * 256 * 4096 * 4096 / (time.perf_counter() - start)


def write_dialogue(work: Path) -> Path:
    """The 3-round dialogue (round 2 refers to round 1) on a 1024 px CT slice, as a JSONL file whose
    paths are relative to ``SHARED_DATA``."""
    dialogue = Dialogue("ct-abdomen-3-rounds", SLICE, list(ROUNDS))
    path = work / "dialogue.jsonl"
    write_jsonl([dialogue], path)
    return path


# ---- the stages, each in its own process -------------------------------------------------------------


class StageRun:
    """What a stage process measures; ``deadline`` is the wall-clock time the parent stops it at."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work)
        self.deadline = args.deadline
        self.result: dict = {"stage": args.stage, "status": "ok", "seconds": {}, "rss_gib": {}}
        torch.set_num_threads(args.threads)

    def mark(self, phase: str, started: float) -> None:
        """Seconds of ``phase`` and the RSS right after it."""
        self.result["seconds"][phase] = round(time.perf_counter() - started, 2)
        self.result["rss_gib"][f"after {phase}"] = round(rss_gib(), 2)

    def check_projection(self, model, tokens: int, passes: float) -> None:
        """Skip the stage when ``passes`` language-model passes over ``tokens`` tokens are projected to
        take longer than the time left (the vision towers, SAM and the backward's extras come on top)."""
        text = model.llava.config.text_config
        per_token = 2 * sum(p.numel() for p in model.llava.model.language_model.layers.parameters())
        per_token += 2 * text.hidden_size * text.vocab_size
        flops = per_token * tokens * passes
        rate = matmul_flops_per_s(self.args.threads)
        projected = flops / rate
        left = self.deadline - time.time()
        self.result["projection"] = {"tokens": tokens, "passes": passes, "tflop": round(flops / 1e12, 2),
                                     "bf16_matmul_gflops": round(rate / 1e9, 1), "projected_s": round(projected),
                                     "time_left_s": round(left)}
        if projected > left:
            raise StageSkipped(
                f"the language model alone is projected to need {projected / 60:.0f} min ({flops / 1e12:.1f} TFLOP "
                f"at {rate / 1e9:.1f} GFLOP/s of bf16 matmul measured here) and {left / 60:.1f} min are left; "
                "run with fewer --text-layers (the same widths, vocabulary and image tokens)"
            )

    def recipe_model_overrides(self) -> list[str]:
        sam = TINY_SAM if self.args.size == "tiny" else {}
        return [f"model.mllm.source={self.work / 'llava'}"] + [f"model.segmenter.{k}={v}" for k, v in sam.items()]

    def run(self) -> dict:
        try:
            if self.args.stage == "infer":
                self.infer()
            else:
                self.train()
        except StageSkipped as skipped:
            self.result.update(status="skipped", reason=str(skipped))
        self.result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2)
        return self.result

    def infer(self) -> None:
        """The default preset through ``run_inference`` (what ``mediround infer`` runs), cached then not."""
        config = preset("llava-med-7b", mllm_path=str(self.work / "llava"), sam_checkpoint=None)
        if self.args.size == "tiny":
            config.segmenter = dataclasses.replace(config.segmenter, **TINY_SAM)
        started = time.perf_counter()
        model = build_model(config, allow_partial=True).eval()
        self.mark("build", started)
        dialogue = load_dialogues(self.work / "dialogue.jsonl", root=SHARED_DATA).dialogues[0]
        tokens = len(model.processor.layout.dialogue(dialogue)[0].ids)
        self.check_projection(model, tokens, 1 + len(dialogue.rounds))
        folders = {}
        for use_cache, name in ((True, "cached"), (False, "no-cache")):
            folder = self.work / f"infer-{name}"
            run = InferenceConfig(data=str(self.work / "dialogue.jsonl"), model=str(self.work / "llava"),
                                  out=str(folder), use_cache=use_cache, root=str(SHARED_DATA))
            model.encoder_calls.clear()
            started = time.perf_counter()
            run_inference(run, model=model)
            self.mark(f"infer {name}", started)
            self.result[f"encoder_calls {name}"] = dict(model.encoder_calls)
            folders[name] = folder
        image_shape = load_image(dialogue.image_path).shape[:2]
        rounds = []
        cached, uncached = (read_predictions(folders[n]) for n in ("cached", "no-cache"))
        for key in sorted(cached):
            a, b = (load_mask(folders[n] / records[key]["mask"]) for n, records in
                    (("cached", cached), ("no-cache", uncached)))
            rounds.append({"round": key[1], "identical": bool((a == b).all()), "shape": list(a.shape),
                           "at_image_size": a.shape == image_shape == b.shape, "foreground": int(a.sum())})
        self.result.update(tokens=tokens, image_shape=list(image_shape), rounds=rounds,
                           masks_identical=all(r["identical"] for r in rounds) and len(rounds) == len(dialogue.rounds),
                           masks_at_image_size=all(r["at_image_size"] for r in rounds))

    def train(self) -> None:
        """One stage-1 step through ``engine.run_stage`` with the recipe's trainable split."""
        output = self.work / self.args.stage
        recipe = load_recipe(RECIPES[self.args.stage], self.recipe_model_overrides() + TRAIN_OVERRIDES + [
            f"data.train={self.work / 'dialogue.jsonl'}", f"data.root={SHARED_DATA}", f"output={output}",
            f"train.threads={self.args.threads}"])
        objective = MeasuredTeacherForcing(recipe, self)
        steps: list[StepLogged] = []
        started = time.perf_counter()
        run_stage(objective, recipe, cpu=True, allow_partial_load=True,
                  on_event=lambda event: steps.append(event) if isinstance(event, StepLogged) else None)
        self.result["seconds"]["step, checkpoint and final model"] = round(
            time.perf_counter() - started - self.result["seconds"]["build"], 2)
        objective.compare_after_step()
        if steps:
            self.result.update(loss=steps[0].loss, grad_norm=steps[0].grad_norm, lr=steps[0].lr)
        shutil.rmtree(output, ignore_errors=True)


class MeasuredTeacherForcing(TeacherForcing):
    """Stage 1's objective, timed, with the trainable weights copied before the step so the step's effect
    can be counted (and a checksum of every frozen weight, which must not move)."""

    def __init__(self, recipe, stage: StageRun):
        super().__init__(recipe)
        self.stage = stage

    def build(self, engine, start):
        started = time.perf_counter()
        parts = super().build(engine, start)
        self.stage.mark("build", started)
        model, result = self.model, self.stage.result
        counts = trainable_parameters(model)
        tokens = len(model.processor.layout.dialogue(start.train_dialogues[0])[0].ids)
        settings = self.recipe.model
        estimate = estimate_training_memory(settings, model, batch_size=1, sequence_length=tokens)
        result.update(
            tokens=tokens,
            token_embeddings=settings.trainable.token_embeddings,
            trainable=counts["trainable"],
            trainable_by_part={k.removeprefix("trainable."): v for k, v in counts.items() if k.startswith("trainable.")},
            doctor_estimate_gib=estimate.as_gib(),
        )
        if self.stage.args.size == "7b" and self.stage.args.text_layers == 32:
            result["docs_trainable"] = DOCS_TRAINABLE[settings.trainable.token_embeddings]
        # Forward, recomputation under gradient checkpointing, and a backward of about two forwards.
        self.stage.check_projection(model, tokens, 4)
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.frozen_sums = self.frozen_checksum()
        self.stepped = time.perf_counter()
        return parts

    def frozen_checksum(self) -> torch.Tensor:
        return torch.stack([p.detach().float().sum() for p in self.model.parameters() if not p.requires_grad])

    def accumulate(self, engine, micro):
        started = time.perf_counter()
        outcome = super().accumulate(engine, micro)
        self.stage.mark("forward and backward", started)
        self.had_gradient = {n: p.grad != 0 for n, p in self.model.named_parameters()
                             if p.requires_grad and p.grad is not None}
        self.stage.result["with_gradient"] = sum(int(m.sum()) for m in self.had_gradient.values())
        return outcome

    def compare_after_step(self) -> None:
        params = dict(self.model.named_parameters())
        by_dtype: dict[str, list[int]] = {}
        for name, before in self.before.items():
            moved = params[name].detach() != before
            had_gradient = self.had_gradient.get(name, torch.zeros_like(moved))
            # Keyed by the dtype built and the dtype trained: the engine keeps trainable weights in fp32.
            dtypes = [str(t).removeprefix("torch.") for t in (before.dtype, params[name].dtype)]
            entry = by_dtype.setdefault(" built, ".join(dtypes) + " trained", [0, 0, 0, 0])
            entry[0] += int(moved.sum())
            entry[1] += before.numel()
            entry[2] += int(had_gradient.sum())
            entry[3] += int((had_gradient & ~moved).sum())
        self.stage.result.update(
            updated=sum(v[0] for v in by_dtype.values()),
            gradient_but_unchanged=sum(v[3] for v in by_dtype.values()),
            updated_by_dtype={k: {"updated": v[0], "trainable": v[1], "with_gradient": v[2], "gradient_but_unchanged": v[3]}
                              for k, v in by_dtype.items()},
            frozen_unchanged=bool(torch.equal(self.frozen_checksum(), self.frozen_sums)),
        )


# ---- the parent: one process per stage, watched ------------------------------------------------------


def run_stage_process(name: str, args: argparse.Namespace, work: Path, deadline: float) -> dict:
    """Run one stage in a child process; stop it at ``--max-rss-gib`` or at ``deadline`` and say so."""
    command = [sys.executable, __file__, "--stage", name, "--work", str(work), "--size", args.size,
               "--text-layers", str(args.text_layers), "--threads", str(args.threads), "--deadline", str(deadline)]
    started = time.perf_counter()
    child = subprocess.Popen(command, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak, stopped = 0.0, None
    while child.poll() is None:
        peak = max(peak, rss_gib("VmRSS", child.pid))
        if peak > args.max_rss_gib:
            stopped = f"stopped: its RSS reached {peak:.1f} GiB, over --max-rss-gib {args.max_rss_gib:g}"
        elif time.time() > deadline:
            stopped = f"stopped: still running when the time budget ({args.budget_minutes:g} min) ran out"
        if stopped:
            child.kill()
            child.wait()
            break
        time.sleep(POLL_S)
    seconds = round(time.perf_counter() - started, 1)
    result_file = work / f"{name}.json"
    if stopped or not result_file.is_file():
        reason = stopped or f"the stage process exited with status {child.returncode} (see its output above)"
        partial = json.loads(result_file.read_text()) if result_file.is_file() else {}
        return {**partial, "stage": name, "status": "did not fit" if stopped else "failed", "reason": reason,
                "peak_rss_gib": round(peak, 2), "wall_s": seconds}
    result = json.loads(result_file.read_text())
    result["wall_s"] = seconds
    return result


def verdicts(result: dict) -> list[str]:
    """What a finished stage must show: the checks of issue #18, as lines of the table."""
    if result["status"] != "ok":
        return [f"{result['status']}: {result['reason']}"]
    if result["stage"] == "infer":
        height, width = result["image_shape"]
        return [f"masks cached == no-cache: {result['masks_identical']}; at image size {width}x{height}: "
                + str(result["masks_at_image_size"])]
    docs = f", docs/model.md {result['docs_trainable']:,}" if "docs_trainable" in result else ""
    lines = [f"trainable {result['trainable']:,} ({result['token_embeddings']} embeddings){docs}",
             (f"received a gradient {result['with_gradient']:,}; changed by the step {result['updated']:,}; "
              f"frozen weights unchanged: {result['frozen_unchanged']}")]
    lines += [(f"  {dtype}: {v['trainable']:,} trainable, {v['with_gradient']:,} with a gradient, {v['updated']:,} "
               f"changed, {v['gradient_but_unchanged']:,} with a gradient but unchanged")
              for dtype, v in result["updated_by_dtype"].items()]
    estimate = result["doctor_estimate_gib"]
    lines.append(f"doctor's estimate (GPU, {result['tokens']} tokens, batch 1): {estimate['total']} GiB "
                 f"(weights {estimate['weights']}, optimiser {estimate['optimiser']}) vs measured peak RSS "
                 f"{result['peak_rss_gib']} GiB")
    return lines


def print_table(report: dict) -> None:
    print(f"\nfull-size smoke, size {report['size']} ({report['text_layers']} text layers), "
          f"{report['machine']['cpus']} CPUs, torch {report['versions']['torch']}, "
          f"transformers {report['versions']['transformers']}")
    print(f"{'stage':<12} {'status':<12} {'wall s':>8} {'peak RSS GiB':>13}  phases (s)")
    for result in report["stages"]:
        phases = ", ".join(f"{k} {v}" for k, v in result.get("seconds", {}).items())
        print(f"{result['stage']:<12} {result['status']:<12} {result['wall_s']:>8} {result['peak_rss_gib']:>13}  {phases}")
        for line in verdicts(result):
            print(f"{'':<12} {line}")
    print(f"load average before {report['load_average']['before']:.2f}, after {report['load_average']['after']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("7b", "tiny"), default="7b")
    parser.add_argument("--text-layers", type=int, default=None,
                        help="decoder layers of the language model (default: 32 for 7b, 2 for tiny)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--out", default="runs/full-size-smoke")
    parser.add_argument("--max-rss-gib", type=float, default=22.0)
    parser.add_argument("--budget-minutes", type=float, default=25.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.text_layers is None:
        args.text_layers = 32 if args.size == "7b" else 2
    if args.stage is not None:
        import transformers

        # Every weight of the stand-in is "missing": transformers' table of them would fill the terminal.
        transformers.logging.set_verbosity_error()
        stage = StageRun(args)
        write_json(Path(args.work) / f"{args.stage}.json", stage.run())
        return

    started = time.time()
    deadline = started + args.budget_minutes * 60
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    layout = llava_med_v15_config(args.text_layers) if args.size == "7b" else tiny_llava_layout(args.text_layers)
    write_stand_in_folder(work / "llava", layout)
    write_dialogue(work)
    import transformers

    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "size": args.size,
        "text_layers": args.text_layers,
        "limits": {"max_rss_gib": args.max_rss_gib, "budget_minutes": args.budget_minutes},
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "processor": platform.processor(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "load_average": {"before": os.getloadavg()[0]},
        "stages": [],
    }
    for name in args.stages:
        if time.time() >= deadline:
            report["stages"].append({"stage": name, "status": "not run", "reason": "no time left in the budget",
                                     "wall_s": 0.0, "peak_rss_gib": 0.0})
            continue
        print(f"== {name}: {(deadline - time.time()) / 60:.1f} min of the budget left", flush=True)
        report["stages"].append(run_stage_process(name, args, work, deadline))
    report["load_average"]["after"] = os.getloadavg()[0]
    report["total_s"] = round(time.time() - started, 1)
    write_json(out / "full_size_smoke.json", report)
    print_table(report)
    print(f"written: {out / 'full_size_smoke.json'}")


if __name__ == "__main__":
    main()

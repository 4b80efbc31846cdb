"""A dress rehearsal of the paper's run: the reproduce sequence of docs/real-weights.md, end to end through
the ``mediround`` CLI, at real widths on CPU (issue #29).

Run by hand before booking GPUs, never in CI (docs/real-weights.md, "Dress rehearsal on CPU")::

    python benchmarks/paper_path_rehearsal.py                       # both recipes, ~40 min on 2 idle cores
    python benchmarks/paper_path_rehearsal.py --recipes 24gb        # one recipe

In a scratch folder (``--out``, default runs/paper-path-rehearsal) it lays out what the docs' commands
expect, under the docs' own paths:

- ``weights/llava-med-v1.5-mistral-7b-hf``: LLaVA-Med v1.5's layout (``mediround.model.stand_in``: every
  width, CLIP ViT-L/14-336 with 576 image tokens, the 32,000-entry vocabulary, bf16) with 2 of the 32
  decoder layers, and random weights written into it, so that ``doctor`` checks a complete folder and every
  command loads it without ``--allow-partial-load`` (an empty weight file would be re-initialised at random
  by every process, and the exported model could not be compared with the unexported one);
- ``weights/medsam_vit_b.pth``: a random SAM ViT-B state dict (1,024 px) saved as MedSAM ships it;
- ``data/mr-medseg/{train,val}.json``: the real slices of ../shared/data/biomedparse-demo through
  ``mediround build-dialogues`` and then ``mediround convert`` to the MR-MedSeg JSON (12 train dialogues,
  1 validation dialogue of 3 rounds);
- ``recipes``: a link to the repository's recipes.

Then every step runs as a subprocess from that folder, with the command line in ``SEQUENCES`` (the docs'
line, its ``--gpus N`` replaced by the CPU launch, plus the rehearsal's small sizes as ``KEY=VALUE``
overrides and output paths; tests/test_rehearsal_docs.py checks that every docs line is in
docs/real-weights.md). Each step is watched: its whole process tree's RSS is sampled every 0.2 s (the peak
of each process), and the doctor's estimate for that setting is set beside the measured peak of the
training steps. Checks: exit codes (the killed run's is the kill), the checkpoint files (safetensors and
JSON only, no pickle), and that ``infer`` from the exported folder gives the masks ``eval`` gave from the
unexported checkpoint at the same beta. Prints a table; the last line is ``rehearsal: N of M steps passed``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "biomedparse-demo"
TEXT_LAYERS = 2
POLL_S = 0.2
GIB = 1024**3
LLAVA = "weights/llava-med-v1.5-mistral-7b-hf"
MEDSAM = "weights/medsam_vit_b.pth"
DATA = "data/mr-medseg"
BEST = "checkpoints/best"
"""The best-validation checkpoint folder of a run (``checkpoint.keep_best``)."""
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

TRAIN_SIZES = ["train.batch_size=1", "train.grad_accum=1", "train.max_steps=2", "train.warmup_steps=1",
               "train.num_workers=0", "validation.every=1", "validation.batch_size=1", "checkpoint.every=1",
               "log.every=1"]
"""Two optimizer steps of one dialogue each, a checkpoint and a validation (the recipe's: the whole split,
here 1 dialogue, teacher-forced and chained) after each; the recipe keeps the best in checkpoints/best. No data-loader workers: each would be a fork of
the training process, whose shared pages a per-process RSS counts twice."""
JCM_SIZES = ["train.batch_size=1", "train.grad_accum=1", "train.max_steps=1", "train.warmup_steps=1",
             "train.num_workers=0", "validation.every=1", "checkpoint.every=1", "log.every=1"]
"""One stage-2 optimizer step and its validation (chained, JCM at beta 0.6), kept as checkpoints/best."""


@dataclass
class Step:
    """One command of the sequence: ``docs`` as docs/real-weights.md writes it, its ``gpu_launch`` part
    replaced by ``cpu_launch`` here, and ``extra`` arguments (sizes, output paths) appended."""

    name: str
    docs: str
    gpu_launch: str = ""
    cpu_launch: str = ""
    extra: list[str] = field(default_factory=list)
    kill_after: str | None = None
    """A path whose appearance makes the rehearsal kill the run (SIGKILL to its process group)."""
    estimate_from: str | None = None
    """The doctor step whose estimate applies to this one."""

    def argv(self) -> list[str]:
        line = self.docs
        if self.gpu_launch:
            assert self.gpu_launch in line, (self.docs, self.gpu_launch)
            line = line.replace(self.gpu_launch, self.cpu_launch)
        return shlex.split(line) + self.extra


def sequence(recipe: str) -> list[Step]:
    """The reproduce sequence of docs/real-weights.md for ``4gpu`` (ZeRO-2 on 2 CPU processes) or ``24gb``
    (one process)."""
    if recipe == "4gpu":
        run, jcm, gpu, cpu = "runs/mediround-7b-4gpu", "runs/jcm-7b-4gpu", "--gpus 4", "--cpu --num-processes 2"
        doctor = Step("doctor", "mediround doctor recipes/mediround-7b-4gpu.yaml --gpus 4 --deepspeed recipes/zero2.json",
                      "--gpus 4", "--gpus 2", TRAIN_SIZES)
        train = "mediround train recipes/mediround-7b-4gpu.yaml --gpus 4 --deepspeed recipes/zero2.json"
        train_jcm = (f"mediround train-jcm recipes/jcm-7b-4gpu.yaml --model {run}/{BEST} --gpus 4 "
                     "--deepspeed recipes/zero2.json")
    else:
        run, jcm, gpu, cpu = "runs/mediround-7b-24gb", "runs/jcm-7b-24gb", "--gpus 1", "--cpu"
        doctor = Step("doctor", "mediround doctor recipes/mediround-7b-24gb.yaml --gpu-memory 24", extra=TRAIN_SIZES)
        train = "mediround train recipes/mediround-7b-24gb.yaml --gpus 1"
        train_jcm = f"mediround train-jcm recipes/jcm-7b-4gpu.yaml --model {run}/{BEST} --gpus 1 output={jcm}"
    exported = f"exported/{Path(jcm).name}"
    return [
        doctor,
        Step("train (killed)", train, gpu, cpu, TRAIN_SIZES, kill_after=f"{run}/checkpoints/step-00000001",
             estimate_from="doctor"),
        Step("train --resume", train + " --resume", gpu, cpu, TRAIN_SIZES, estimate_from="doctor"),
        Step("train-jcm", train_jcm, gpu, cpu, JCM_SIZES),
        Step("eval", f"mediround eval {DATA}/val.json --model {jcm}/{BEST} --per-round --beta 0.2,0.4,0.6,0.8 "
             "--compare-tf", extra=["--predictions-out", f"preds/eval-{Path(jcm).name}"]),
        Step("export --merge", f"mediround export {jcm}/{BEST} {exported} --merge"),
        Step("infer", f"mediround infer {DATA}/val.json --model {exported} --out preds/val --gpus 4", "--gpus 4", cpu,
             ["--overwrite"]) if recipe == "4gpu" else
        Step("infer", f"mediround infer {DATA}/val.json --model {exported} --out preds/val-24gb --gpus 1", "--gpus 1",
             cpu, ["--overwrite"]),
    ]


RECIPES = ("4gpu", "24gb")


# ---- the scratch folder ---------------------------------------------------------------------------------


def write_inputs(work: Path) -> dict:
    """The weights, data and recipes the docs' commands expect, under the docs' paths in ``work``."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from mediround.model import preset
    from mediround.model.segmenter import build_sam
    from mediround.model.stand_in import llava_med_v15_config, write_stand_in_folder

    started = time.perf_counter()
    folder = write_stand_in_folder(work / LLAVA, llava_med_v15_config(TEXT_LAYERS))
    torch.manual_seed(0)
    config = llava_med_v15_config(TEXT_LAYERS)
    config.dtype = torch.bfloat16
    llava = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    llava.save_pretrained(folder)
    parameters = sum(p.numel() for p in llava.parameters())
    del llava
    sam = build_sam(preset("llava-med-7b", mllm_path=str(folder), sam_checkpoint=None).segmenter, "cpu")
    torch.save(sam.state_dict(), work / MEDSAM)
    del sam
    (work / "recipes").symlink_to(REPO / "recipes")
    weights_s = time.perf_counter() - started
    for argv in (["mediround", "build-dialogues", str(SHARED_DATA), DATA],
                 ["mediround", "convert", f"{DATA}/train.jsonl", f"{DATA}/train.json"],
                 ["mediround", "convert", f"{DATA}/val.jsonl", f"{DATA}/val.json"]):
        subprocess.run(argv, cwd=work, check=True, stdout=subprocess.DEVNULL)
    return {"llava_parameters": parameters, "weights_s": round(weights_s, 1),
            "data_s": round(time.perf_counter() - started - weights_s, 1)}


# ---- running and watching one step ------------------------------------------------------------------------


def tree_rss(root: psutil.Process) -> dict[int, tuple[str, int]]:
    """RSS in bytes of ``root`` and every descendant, by pid, with a short name."""
    rss = {}
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return rss
    for process in processes:
        try:
            cmdline = process.cmdline()
            rss[process.pid] = (" ".join(cmdline[1:4]), process.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return rss


def run_step(step: Step, work: Path, log: Path, timeout_s: float) -> dict:
    """Run ``step`` in ``work``; its output goes to ``log``. Peak RSS per process, wall time, exit code."""
    argv = step.argv()
    started = time.perf_counter()
    peaks: dict[int, tuple[str, int]] = {}
    killed = None
    with log.open("w") as out:
        out.write("$ " + shlex.join(argv) + "\n")
        out.flush()
        child = subprocess.Popen(argv, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"})
        root = psutil.Process(child.pid)
        while child.poll() is None:
            for pid, (name, rss) in tree_rss(root).items():
                if rss > peaks.get(pid, ("", 0))[1]:
                    peaks[pid] = (name, rss)
            if step.kill_after and (work / step.kill_after).is_dir():
                killed = f"killed after {step.kill_after} appeared"
            elif time.perf_counter() - started > timeout_s:
                killed = f"stopped after {timeout_s:.0f} s"
            if killed:
                # Every process of the tree, as a crashed node would lose them: Accelerate's launcher and its
                # ranks run in process groups of their own.
                for process in [root, *root.children(recursive=True)]:
                    try:
                        process.send_signal(signal.SIGKILL)
                    except psutil.NoSuchProcess:
                        continue
                child.wait()
                break
            time.sleep(POLL_S)
    leftovers = stop_leftovers(work)
    per_process = sorted((rss for _, rss in peaks.values()), reverse=True)
    return {"step": step.name, "argv": argv, "exit": child.returncode, "killed": killed,
            "wall_s": round(time.perf_counter() - started, 1), "leftover_processes": leftovers,
            "peak_rss_gib": [round(rss / GIB, 2) for rss in per_process if rss > 0.2 * GIB] or
                            [round(per_process[0] / GIB, 2) if per_process else 0.0]}


def stop_leftovers(work: Path) -> int:
    """Kill processes still running in ``work`` after a step ended (ranks a killed launcher left behind),
    so that the next step starts alone; their number."""
    found = 0
    for process in psutil.process_iter(["cwd"]):
        try:
            if process.info["cwd"] and Path(process.info["cwd"]) == work and process.pid != os.getpid():
                process.send_signal(signal.SIGKILL)
                found += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def doctor_estimate(log: Path) -> float | None:
    """The GPU memory row's ``estimated peak X GiB per process`` of a doctor log."""
    found = re.search(r"estimated peak ([0-9.]+) GiB per process", log.read_text())
    return float(found.group(1)) if found else None


# ---- the checks after a sequence ------------------------------------------------------------------------


def pickle_free(folders: list[Path]) -> tuple[bool, str]:
    """Every file the runs and exports wrote is safetensors, JSON or text: no pickle suffix and no pickle
    protocol header (0x80 then a protocol number) at the start of any other file."""
    counts: dict[str, int] = {}
    bad = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            counts[path.suffix or path.name] = counts.get(path.suffix or path.name, 0) + 1
            head = path.read_bytes()[:2] if path.suffix != ".safetensors" else b""
            if path.suffix in PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80 and head[1] <= 5):
                bad.append(str(path))
    summary = ", ".join(f"{n} {suffix}" for suffix, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return not bad, (f"pickle: {bad[:3]}" if bad else summary)


def same_masks(eval_track: Path, infer_out: Path) -> tuple[bool, str]:
    """``infer`` from the exported folder against ``eval``'s track of the unexported checkpoint: every
    round's mask equal."""
    from mediround.data.images import load_mask
    from mediround.data.predictions import read_predictions

    if not (eval_track / "predictions.jsonl").is_file() and not any(eval_track.glob("*.jsonl")):
        return False, f"no predictions in {eval_track}"
    a, b = read_predictions(eval_track), read_predictions(infer_out)
    if sorted(a) != sorted(b) or not a:
        return False, f"rounds differ: {len(a)} vs {len(b)}"
    differing = []
    for key in sorted(a):
        left, right = load_mask(eval_track / a[key]["mask"]), load_mask(infer_out / b[key]["mask"])
        if left.shape != right.shape or not np.array_equal(left, right):
            differing.append(f"{key}: {int((left != right).sum()) if left.shape == right.shape else 'shape'} px")
    if differing:
        return False, f"{len(differing)} of {len(a)} masks differ ({'; '.join(differing[:3])})"
    return True, f"{len(a)} of {len(a)} masks equal"


def run_sequence(recipe: str, work: Path, logs: Path, timeout_s: float) -> list[dict]:
    results = []
    estimates: dict[str, float | None] = {}
    for index, step in enumerate(sequence(recipe)):
        log = logs / f"{recipe}-{index}-{step.name.split()[0]}.log"
        print(f"== {recipe}: {step.name}: {shlex.join(step.argv())}", flush=True)
        result = run_step(step, work, log, timeout_s)
        result["recipe"] = recipe
        if step.name == "doctor":
            estimates[step.name] = result["estimate_gib"] = doctor_estimate(log)
        if step.estimate_from:
            result["estimate_gib"] = estimates.get(step.estimate_from)
        result["passed"] = (result["killed"] or "").startswith("killed after") if step.kill_after else (
            result["exit"] == 0 and not result["killed"])
        if not result["passed"]:
            result["tail"] = log.read_text().splitlines()[-5:]
        print(f"   exit {result['exit']} ({result['killed'] or 'ran to the end'}), {result['wall_s']} s, "
              f"peak RSS {result['peak_rss_gib']} GiB", flush=True)
        results.append(result)
    ok, detail = pickle_free([work / f"runs/mediround-7b-{recipe}", work / f"runs/jcm-7b-{recipe}",
                              work / f"exported/jcm-7b-{recipe}"])
    results.append({"recipe": recipe, "step": "checkpoint files", "passed": ok, "detail": detail})
    infer_out = work / ("preds/val" if recipe == "4gpu" else "preds/val-24gb")
    ok, detail = same_masks(work / f"preds/eval-jcm-7b-{recipe}/beta-0.6", infer_out)
    results.append({"recipe": recipe, "step": "exported masks == unexported", "passed": ok, "detail": detail})
    return results


def print_table(report: dict) -> None:
    print(f"\npaper-path rehearsal, {report['date']}: LLaVA-Med v1.5 layout with {TEXT_LAYERS} of 32 text layers "
          f"(every width), SAM ViT-B 1024 px, {report['machine']['cpus']} CPUs, torch {report['versions']['torch']}, "
          f"transformers {report['versions']['transformers']}, deepspeed {report['versions']['deepspeed']}")
    print(f"{'recipe':<6} {'step':<30} {'result':<6} {'exit':>5} {'wall s':>7}  {'peak RSS GiB per process':<26} "
          f"{'doctor GiB':>10}")
    for r in report["steps"]:
        result = "ok" if r["passed"] else "FAIL"
        if "argv" not in r:
            print(f"{r['recipe']:<6} {r['step']:<30} {result:<6} {'':>5} {'':>7}  {r['detail']}")
            continue
        estimate = r.get("estimate_gib")
        print(f"{r['recipe']:<6} {r['step']:<30} {result:<6} {r['exit']:>5} {r['wall_s']:>7}  "
              f"{', '.join(map(str, r['peak_rss_gib'])):<26} {estimate if estimate is not None else '':>10}")
        for line in r.get("tail", []):
            print(f"{'':<6}   | {line[:140]}")
    print(f"total {report['total_s'] / 60:.1f} min; load average before {report['load_average']['before']:.2f}, "
          f"after {report['load_average']['after']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/paper-path-rehearsal")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--step-timeout-minutes", type=float, default=20.0)
    args = parser.parse_args()
    import deepspeed
    import torch
    import transformers

    started = time.time()
    out = Path(args.out).resolve()
    work, logs = out / "work", out / "logs"
    shutil.rmtree(out, ignore_errors=True)
    work.mkdir(parents=True)
    logs.mkdir()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "memory_gib": round(psutil.virtual_memory().total / GIB, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "deepspeed": deepspeed.__version__},
        "load_average": {"before": os.getloadavg()[0]},
    }
    print(f"== writing the inputs into {work}", flush=True)
    report["inputs"] = write_inputs(work)
    report["steps"] = []
    for recipe in args.recipes:
        report["steps"] += run_sequence(recipe, work, logs, args.step_timeout_minutes * 60)
    report["load_average"]["after"] = os.getloadavg()[0]
    report["total_s"] = round(time.time() - started, 1)
    (out / "rehearsal.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    passed = sum(r["passed"] for r in report["steps"])
    print(f"written: {out / 'rehearsal.json'}")
    print(f"rehearsal: {passed} of {len(report['steps'])} steps passed")
    sys.exit(0 if passed == len(report["steps"]) else 1)


if __name__ == "__main__":
    main()

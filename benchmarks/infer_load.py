"""Long-run inference: resident memory and throughput over 2,000 synthetic dialogues (tiny preset).

Run: ``python benchmarks/infer_load.py [--dialogues 2000] [--every 100] [--work /tmp/infer-load]``.
One ``run_inference`` call in this process (the path ``mediround infer --cpu`` takes) over a synthetic
test split, with a random tiny checkpoint (speed and memory do not depend on training). Every
``--every`` finished dialogues it prints the resident set size (``VmRSS``) and the throughput of that
window, then the two ratios the reliability guarantee is about:

- memory growth: RSS at the end over RSS after the first 200 dialogues (bounded: < 1.10);
- throughput drift: dialogues per second over the last three windows against the first three after
  200 (within 0.8..1.2), both in wall-clock time and in this process's CPU time. The cores are shared
  with other work, so wall-clock rates swing with the load average (printed before and after); CPU
  seconds per dialogue (one thread) measure the work itself and show a slowdown without that noise.

A leak shows as a steady climb of RSS and of CPU seconds per dialogue.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mediround.data.synth import generate
from mediround.inference.events import InferenceEvents
from mediround.inference.runner import run_inference
from mediround.inference.settings import InferenceConfig
from mediround.model import build_model, preset
from mediround.model.checkpoint import save_checkpoint

WARMUP = 200


def resident_mib() -> float:
    """This process's resident set size (VmRSS) in MiB."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dialogues", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=WARMUP, help="dialogues before the memory baseline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("/tmp/infer-load"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    data = generate(args.work / "data", args.dialogues, 0, split="test").files["test"]
    checkpoint = args.work / "model"
    if not (checkpoint / "config.json").exists():
        save_checkpoint(build_model(preset("tiny")), checkpoint)
    out = args.work / f"out-{int(time.time())}"
    print(f"load average before: {os.getloadavg()}", flush=True)
    print(f"{'done':>6} {'rss MiB':>9} {'wall dlg/s':>11} {'cpu dlg/s':>10}", flush=True)
    samples: list[tuple[int, float, float, float]] = []
    last = {"done": 0, "wall": time.perf_counter(), "cpu": time.process_time()}

    def sample(done: int) -> None:
        if done % args.every and done != args.dialogues:
            return
        wall, cpu = time.perf_counter(), time.process_time()
        count = done - last["done"]
        samples.append((done, resident_mib(), count / (wall - last["wall"]), count / (cpu - last["cpu"])))
        last.update(done=done, wall=wall, cpu=cpu)
        print(f"{done:>6} {samples[-1][1]:>9.1f} {samples[-1][2]:>11.3f} {samples[-1][3]:>10.3f}", flush=True)

    class Sampler(InferenceEvents):
        def progressed(self, finished: int) -> None:
            sample(finished)

    config = InferenceConfig(data=str(data), model=str(checkpoint), out=str(out), betas=(None,))
    summary = run_inference(config, events=Sampler())
    print(f"load average after: {os.getloadavg()}", flush=True)
    after_warmup = [s for s in samples if s[0] > args.warmup]
    at_warmup = next(s for s in samples if s[0] >= args.warmup)
    growth = samples[-1][1] / at_warmup[1]
    print(f"predicted {summary.predicted}, skipped {summary.skipped}")
    print(f"rss after {at_warmup[0]}: {at_warmup[1]:.1f} MiB, at the end: {samples[-1][1]:.1f} MiB, "
          f"growth x{growth:.3f} (bound < 1.10)")
    first, final = after_warmup[:3], after_warmup[-3:]
    for column, name in ((2, "wall-clock"), (3, "CPU-time")):
        start = sum(s[column] for s in first) / len(first)
        end = sum(s[column] for s in final) / len(final)
        print(f"{name} throughput, first 3 windows after {args.warmup}: {start:.3f} dlg/s, last 3: {end:.3f} "
              f"dlg/s, ratio {end / start:.3f} (bound 0.80..1.20)")

if __name__ == "__main__":
    main()

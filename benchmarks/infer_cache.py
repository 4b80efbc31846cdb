"""KV-cached inference vs ``--no-cache``, round-8 vs round-2 cost, and 1- vs 2-process throughput.

Run: ``python benchmarks/infer_cache.py [--dialogues 4] [--repeats 2] [--threads 1] [--throughput-dialogues 8]
[--batch-sizes 1,4,16,64] [--sweep-dialogues 64] [--sweep-threads 1,2] [--sweep-only]``.
Everything uses 8-round dialogues of the synthetic benchmark and a random tiny model (speed does not
depend on training). Printed, measured side by side in one run:

- seconds per dialogue, KV-cached (image encoders once, each round appended to the cache) vs no-cache
  (every round re-runs both image encoders and the whole history, as the authors' code does), and
  their ratio;
- the cost of round 8 over round 2 in the cached path (``step`` + ``decode`` of that round);
- dialogues/s of ``mediround infer --cpu`` with 1 and 2 processes, end to end (process start, model
  load, prediction, merge) on the same data;
- the batch-size sweep (``--batch-sizes 1,4,16,64`` over ``--sweep-dialogues`` dialogues, images decoded
  beforehand): dialogues/s of one dialogue at a time (``chain_dialogue``) and of ``chain_batched`` at each
  batch size, the speed-up over one at a time, and the median seconds of one batched round step (every
  dialogue in the batch advances one round) per round index. All dialogues have 8 rounds, so a batch
  joins and leaves together and step k of a batch is round k of each of its dialogues. The sweep runs at each
  of ``--sweep-threads`` torch thread counts (default 1 and 2, this CPU's cores) and ends with the best
  batched rate over the fastest one-at-a-time rate of any thread count.

The machine has 2 shared cores: the load average is printed before and after; compare ratios only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mediround.data.formats import load_dialogues, write_jsonl
from mediround.data.images import load_image
from mediround.data.synth import generate
from mediround.inference.chain import Track, chain_batched, chain_dialogue
from mediround.model import DialogueSession, build_model, preset
from mediround.model.checkpoint import save_checkpoint
from mediround.model.session import BatchSession

ROUNDS = 8


def eight_round_dialogues(folder: Path, wanted: int, seed: int) -> list:
    """Synthetic dialogues with exactly 8 rounds (generated in batches until there are enough)."""
    found = []
    batch = 0
    while len(found) < wanted:
        summary = generate(folder / f"batch{batch}", 80, seed + batch, split="test")
        loaded = load_dialogues(summary.files["test"])
        found += [d for d in loaded.dialogues if len(d.rounds) == ROUNDS]
        batch += 1
    return found[:wanted]


def timed_rounds(model, dialogue, image) -> dict[int, float]:
    """Seconds of ``DialogueSession.step`` (which also decodes the round's mask) per round number in the
    cached path."""
    costs: dict[int, float] = {}
    step = DialogueSession.step

    def timed_step(session, *args, **kwargs):
        start = time.perf_counter()
        result = step(session, *args, **kwargs)
        costs[session.rounds] = time.perf_counter() - start
        return result

    DialogueSession.step = timed_step
    try:
        chain_dialogue(model, dialogue, image, [Track(None)])
    finally:
        DialogueSession.step = step
    return costs


def batched_sweep(model, dialogues, images, batch_sizes: list[int]) -> tuple[float, dict[int, float]]:
    """Dialogues/s one at a time and batched at each size, and the batched step cost per round index;
    returns the rates (one at a time, by batch size)."""
    start = time.perf_counter()
    for dialogue, image in zip(dialogues, images):
        chain_dialogue(model, dialogue, image, [Track(None)])
    one_at_a_time = len(dialogues) / (time.perf_counter() - start)
    rates = {}
    print(f"batch sweep over {len(dialogues)} dialogues of {ROUNDS} rounds, {torch.get_num_threads()} torch "
          f"thread(s); one at a time (chain_dialogue): {one_at_a_time:.2f} dialogues/s")
    by_id = {dialogue.id: image for dialogue, image in zip(dialogues, images)}
    step = BatchSession.step
    for batch_size in batch_sizes:
        step_costs: dict[int, list[float]] = {n: [] for n in range(1, ROUNDS + 1)}

        def timed_step(batch, rounds, _costs=step_costs):
            began = time.perf_counter()
            results = step(batch, rounds)
            _costs[rounds[0].row.rounds].append(time.perf_counter() - began)
            return results

        BatchSession.step = timed_step
        try:
            start = time.perf_counter()
            for _ in chain_batched(model, dialogues, lambda d: (by_id[d.id], None), [Track(None)],
                                   batch_size=batch_size):
                pass
            rate = rates[batch_size] = len(dialogues) / (time.perf_counter() - start)
        finally:
            BatchSession.step = step
        medians = [statistics.median(step_costs[n]) * 1000 for n in range(1, ROUNDS + 1)]
        print(f"batch {batch_size:>3}: {rate:6.2f} dialogues/s ({rate / one_at_a_time:.2f}x one at a time); "
              f"step ms per round index: " + " ".join(f"{ms:.0f}" for ms in medians)
              + f"; per dialogue-round {statistics.median(medians) / batch_size:.1f} ms; "
              f"round 8 / round 2 {medians[7] / medians[1]:.2f}x")
    return one_at_a_time, rates


def thread_sweeps(model, dialogues, images, batch_sizes: list[int], thread_counts: list[int]) -> None:
    """``batched_sweep`` at each torch thread count, then the best batched rate over the fastest way to run
    one dialogue at a time (on a small model one thread can beat two there: the work is too small to share)."""
    results = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        results[threads] = batched_sweep(model, dialogues, images, batch_sizes)
    alone_threads = max(results, key=lambda t: results[t][0])
    batched_threads, best_size = max(((t, size) for t in results for size in results[t][1]),
                                     key=lambda pair: results[pair[0]][1][pair[1]])
    alone, best = results[alone_threads][0], results[batched_threads][1][best_size]
    print(f"best: batch {best_size} with {batched_threads} thread(s), {best:.2f} dialogues/s = {best / alone:.2f}x the "
          f"fastest one at a time ({alone:.2f} dialogues/s with {alone_threads} thread(s))")


def run_cli(data: Path, checkpoint: Path, out: Path, processes: int) -> float:
    command = [sys.executable, "-m", "mediround_cli.main", "infer", str(data), "--model", str(checkpoint),
               "--out", str(out), "--cpu", "--num-processes", str(processes), "--beta", "off"]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=4, help="dialogues timed cached vs no-cache")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    parser.add_argument("--throughput-dialogues", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-sizes", default="1,4,16,64", help="comma-separated batch sizes to sweep")
    parser.add_argument("--sweep-dialogues", type=int, default=64)
    parser.add_argument("--sweep-threads", default="1,2", help="comma-separated torch thread counts of the sweep")
    parser.add_argument("--sweep-only", action="store_true", help="only the batch-size sweep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f}; torch threads {args.threads}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dialogues = eight_round_dialogues(
            folder, max(args.dialogues, args.throughput_dialogues, args.sweep_dialogues), args.seed
        )
        model = build_model(preset("tiny")).eval()
        sweep = dialogues[: args.sweep_dialogues]
        thread_sweeps(model, sweep, [load_image(d.image_path) for d in sweep],
                      [int(size) for size in args.batch_sizes.split(",")],
                      [int(count) for count in args.sweep_threads.split(",")])
        torch.set_num_threads(args.threads)
        if args.sweep_only:
            print(f"load average after: {os.getloadavg()[0]:.2f}")
            return
        cached, uncached, round_costs = [], [], {n: [] for n in range(1, ROUNDS + 1)}
        for _ in range(args.repeats):
            for dialogue in dialogues[: args.dialogues]:
                image = load_image(dialogue.image_path)
                start = time.perf_counter()
                chain_dialogue(model, dialogue, image, [Track(None)])
                cached.append(time.perf_counter() - start)
                start = time.perf_counter()
                chain_dialogue(model, dialogue, image, [Track(None)], use_cache=False)
                uncached.append(time.perf_counter() - start)
                for number, seconds in timed_rounds(model, dialogue, image).items():
                    round_costs[number].append(seconds)
        cached_s, uncached_s = statistics.median(cached), statistics.median(uncached)
        print(f"per dialogue (8 rounds, median of {len(cached)}): cached {cached_s * 1000:.0f} ms, "
              f"no-cache {uncached_s * 1000:.0f} ms, ratio no-cache/cached {uncached_s / cached_s:.2f}x (target >= 3)")
        medians = {n: statistics.median(v) for n, v in round_costs.items()}
        print("cached cost per round (ms): " + ", ".join(f"r{n} {s * 1000:.1f}" for n, s in medians.items()))
        print(f"round 8 / round 2 (cached): {medians[8] / medians[2]:.2f}x (target <= 1.3)")

        data = folder / "eight_rounds.jsonl"
        subset = dialogues[: args.throughput_dialogues]
        for dialogue in subset:
            dialogue.image = str(dialogue.image_path)
            for round_ in dialogue.rounds:
                round_.mask = str(dialogue.path(round_.mask))
        write_jsonl(subset, data)
        checkpoint = save_checkpoint(model, folder / "checkpoint")
        one = run_cli(data, checkpoint, folder / "one", 1)
        two = run_cli(data, checkpoint, folder / "two", 2)
        n = len(subset)
        print(f"mediround infer end to end, {n} dialogues: 1 process {n / one:.2f} dialogues/s ({one:.1f} s), "
              f"2 processes {n / two:.2f} dialogues/s ({two:.1f} s), speed-up {one / two:.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

"""End-to-end batching through the command line: ``mediround infer --batch-size 64`` over ``--batch-size 1``
in dialogues per second, start-up cancelled, beside the model-only ratio measured in the same run.

Run: ``python benchmarks/infer_end_to_end.py [--dialogues 128] [--small 32] [--rounds 5] [--repeats 3]
[--batch-size 64] [--threads N] [--model DIR] [--source DIR ...]``.

Data: synthetic dialogues (``mediround.data.synth.generate``, test split, 128 x 128 images). The generator
gives 2 to 8 rounds a dialogue, so the dialogues with at least ``--rounds`` rounds are kept and cut to their
first ``--rounds`` rounds (a round refers only to an earlier round, so a prefix of a dialogue is a whole
dialogue, with its ground-truth masks). The big set is the first ``--dialogues`` of them, the small set its
first ``--small``.

End to end: each ``mediround infer DATA --batch-size B`` is a fresh process (the console script's entry, with
the checkout of ``--source`` first on PYTHONPATH; default this one) doing everything a user's run does:
start Python and torch, load the model, read images, predict, write masks and records, merge, score.
Dialogues/s = (N_big - N_small) / (t_big - t_small), so the start-up and the per-run fixed costs cancel;
each repeat runs every (source, batch size, set) once, in an order rotated by one each repeat, and the
median of the repeats' rates is printed. Model-only: ``chain_batched`` in this process over the big set's
images decoded beforehand, at the same two batch sizes (one run each per repeat, median of the repeats'
rates). The ratio of each is batch ``--batch-size`` over batch 1.

``--threads N`` sets ``OMP_NUM_THREADS`` of the runs and torch's threads here (default: torch's own choice,
what a user gets). On a machine whose cores other jobs keep busy, torch's default of one thread per core
makes small operations wait for descheduled threads (there, one-dialogue rounds ran 20x slower with 2
threads than with 1); measure with ``--threads 1`` then.

With two sources (e.g. an older commit unpacked by ``git archive REF | tar -x -C /tmp/before``) the
end-to-end rows of both come from the same repeats, side by side. The machine's cores are shared: the
load average is printed before and after; compare ratios of one run only.
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
from mediround.default_model import default_checkpoint
from mediround.inference.chain import Track, chain_batched
from mediround.inference.checkpoint_policy import checked_betas, model_folder
from mediround.model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# What the ``mediround`` console script runs.
ENTRY = "import sys; from mediround_cli.main import cli; sys.exit(cli(prog_name='mediround'))"


def write_sets(folder: Path, big: int, small: int, rounds: int, seed: int) -> tuple[Path, Path, list]:
    """``big.jsonl`` and ``small.jsonl`` (its first ``small`` lines) of ``rounds``-round dialogues in
    ``folder``; returns their paths and the big set's dialogues."""
    count = 4 * big
    while True:
        summary = generate(folder, count, seed, split="test")
        long_enough = [d for d in load_dialogues(summary.files["test"]).dialogues if len(d.rounds) >= rounds]
        if len(long_enough) >= big:
            break
        count *= 2
    chosen = long_enough[:big]
    for dialogue in chosen:
        dialogue.rounds = dialogue.rounds[:rounds]
    write_jsonl(chosen, folder / "big.jsonl")
    write_jsonl(chosen[:small], folder / "small.jsonl")
    return folder / "big.jsonl", folder / "small.jsonl", chosen


# OMP_NUM_THREADS of the runs, when --threads is given.
THREADS: dict[str, str] = {}


def run_cli(source: Path, data: Path, model: Path, out: Path, batch_size: int, folder: Path) -> float:
    """Seconds of one ``mediround infer`` run, from ``folder`` (``python -c`` puts the working folder before
    PYTHONPATH, so it must hold no checkout)."""
    paths = [str(source), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONWARNINGS": "ignore", **THREADS}
    command = [sys.executable, "-c", ENTRY, "infer", str(data), "--model", str(model), "--out", str(out),
               "--batch-size", str(batch_size), "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, env=env, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def model_only_seconds(model, dialogues, images, tracks, batch_size: int) -> float:
    by_id = {dialogue.id: image for dialogue, image in zip(dialogues, images)}
    start = time.perf_counter()
    for outcome in chain_batched(model, dialogues, lambda d: (by_id[d.id], None), tracks, batch_size=batch_size):
        if outcome.error is not None:
            raise outcome.error
    return time.perf_counter() - start


def _ratio(seconds: dict, source: Path, sizes: tuple[int, int], small: Path, big: Path, extra: int) -> float:
    """Batched over batch-1 dialogues/s of one source, from one repeat's seconds per run."""
    batched, alone = (extra / (seconds[(source, size, big)] - seconds[(source, size, small)]) for size in sizes)
    return batched / alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dialogues", type=int, default=128, help="dialogues of the big set")
    parser.add_argument("--small", type=int, default=32, help="dialogues of the small set (its first ones)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every dialogue")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="the batched setting (compared with 1)")
    parser.add_argument("--model", type=Path, help="checkpoint folder [default: the shipped tiny model]")
    parser.add_argument("--source", type=Path, action="append",
                        help="a checkout whose CLI runs (repeatable; default: this repository)")
    parser.add_argument("--threads", type=int, help="torch threads of every run [default: torch's choice]")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not 0 < args.small < args.dialogues:
        parser.error("--small must be between 0 and --dialogues")
    if args.threads is not None:
        THREADS["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    sources = [path.resolve() for path in args.source or [REPO]]
    model_path = model_folder(args.model or default_checkpoint())
    sizes = (args.batch_size, 1)
    extra = args.dialogues - args.small
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; "
          f"torch threads here {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="infer-e2e-") as tmp:
        folder = Path(tmp)
        big, small, dialogues = write_sets(folder / "data", args.dialogues, args.small, args.rounds, args.seed)
        print(f"{args.dialogues} and {args.small} dialogues of {args.rounds} rounds; model {model_path}")
        model = load_checkpoint(model_path).eval()
        tracks = [Track(beta) for beta in checked_betas((), model.config, str(model_path))]
        images = [load_image(d.image_path) for d in dialogues]
        runs = [(source, batch_size, data) for source in sources for batch_size in sizes for data in (small, big)]
        seconds: dict[tuple, list[float]] = {run: [] for run in runs}
        model_only: dict[int, list[float]] = {size: [] for size in sizes}
        for repeat in range(args.repeats):
            shift = repeat % len(runs)
            for source, batch_size, data in runs[shift:] + runs[:shift]:
                out = folder / "out" / f"{sources.index(source)}-{batch_size}-{data.stem}"
                seconds[(source, batch_size, data)].append(run_cli(source, data, model_path, out, batch_size, folder))
            for batch_size in sizes[repeat % 2:] + sizes[:repeat % 2]:
                model_only[batch_size].append(model_only_seconds(model, dialogues, images, tracks, batch_size))
            this = {run: times[-1] for run, times in seconds.items()}
            line = ", ".join(
                f"{sources.index(source)}: end to end {_ratio(this, source, sizes, small, big, extra):.2f}x"
                for source in sources)
            print(f"repeat {repeat + 1} of {args.repeats}: {line}, model only "
                  f"{model_only[sizes[1]][-1] / model_only[sizes[0]][-1]:.2f}x; load average "
                  f"{os.getloadavg()[0]:.2f}; seconds " + " ".join(f"{t:.1f}" for t in this.values()), flush=True)

    print(f"\n{'what':<46}{'batch':>6}{'t small s':>11}{'t big s':>9}{'dialogues/s':>13}{'ratio':>8}")
    ratios = {}
    for source in sources:
        rates = {}
        for batch_size in sizes:
            small_s, big_s = seconds[(source, batch_size, small)], seconds[(source, batch_size, big)]
            rates[batch_size] = statistics.median(extra / (b - s) for s, b in zip(small_s, big_s))
        ratios[source] = rates[args.batch_size] / rates[1]
        for batch_size in sizes:
            small_s, big_s = seconds[(source, batch_size, small)], seconds[(source, batch_size, big)]
            label = f"end to end, {str(source)[-32:]}"
            print(f"{label:<46}{batch_size:>6}{statistics.median(small_s):>11.1f}{statistics.median(big_s):>9.1f}"
                  f"{rates[batch_size]:>13.2f}" + (f"{ratios[source]:>7.2f}x" if batch_size != 1 else ""))
    model_rates = {size: statistics.median(args.dialogues / s for s in model_only[size]) for size in sizes}
    model_ratio = model_rates[args.batch_size] / model_rates[1]
    for batch_size in sizes:
        print(f"{'model only (chain_batched, images decoded)':<46}{batch_size:>6}{'':>11}"
              f"{statistics.median(model_only[batch_size]):>9.1f}{model_rates[batch_size]:>13.2f}"
              + (f"{model_ratio:>7.2f}x" if batch_size != 1 else ""))
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for source in sources:
        print(f"end to end {ratios[source]:.2f}x ({source}), model only {model_ratio:.2f}x: batch "
              f"{args.batch_size} over batch 1, median of {args.repeats}")


if __name__ == "__main__":
    main()

"""Peak memory of ``mediround chat VOLUME`` on a 300-slice volume: the input volume, the output, and a
constant per batch of slices (issue #31).

Run: ``python benchmarks/volume_memory.py [--size 256] [--slices 30,300] [--batch-sizes 16,64]``.
Every measurement runs in a fresh process on a NIfTI of SIZE x SIZE x N int16 voxels (no modality, so
``--window auto`` is the percentile window: the path with the transient copy):

1. the data side alone (``mediround.data.scans.run_scan`` with a stub segmenter that marks bright
   pixels), NumPy's allocations traced (``tracemalloc``): read, window, gather the masks, write the label
   volume and the sidecar. Peak minus (input + output) is what the data side adds besides the two
   volumes; it must not grow with the slice count.
2. the whole command's path with the shipped tiny model (``mediround.inference.volumes.chat_volume``):
   the process's resident high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` once the
   model is loaded and warm) minus its resident size then. Peak minus (input + output) is the per-batch
   constant (the model's activations and KV caches for the slices in flight, the images and masks of the
   batch): the same for 30 and 300 slices, larger for a larger batch.

"input" is the intensities as read (int16 here), "output" the bit volume holding every round's masks
(uint8 up to 8 rounds), each SIZE x SIZE x N.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

QUESTIONS = ("Segment the liver.", "Segment the lesion inside it.")
MIB = 1024 * 1024


def status_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def write_volume(path: Path, size: int, slices: int) -> None:
    import nibabel

    rng = np.random.default_rng(0)
    data = rng.normal(100, 40, (size, size, slices)).astype(np.int16)
    data[size // 4: size // 2, size // 4: size // 2, :] += 400  # a bright block on every slice
    nibabel.save(nibabel.Nifti1Image(data, np.diag([0.8, 0.8, 2.5, 1.0])), path)


def questions():
    from mediround.data.dialogue import Round

    return [Round(QUESTIONS[0]), Round(QUESTIONS[1], ref=1)]


def stub(indices, image_of):
    for index in indices:
        grey = image_of(index)[..., 0]
        yield index, [grey > 200, grey > 100]


def data_side(size: int, slices: int, work: Path) -> dict:
    from mediround.data.scans import ScanOptions, read_scan, run_scan

    write_volume(work / "scan.nii.gz", size, slices)
    tracemalloc.start()
    scan = read_scan(work / "scan.nii.gz")
    result = run_scan(scan, questions(), stub, work / "out", ScanOptions())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"input": scan.intensities.nbytes, "output": int(np.prod(scan.intensities.shape)), "peak": peak,
            "window": result.window}


def model_side(size: int, slices: int, batch_size: int, work: Path) -> dict:
    from mediround.data.scans import ScanOptions, read_scan
    from mediround.default_model import default_checkpoint
    from mediround.inference.checkpoint_policy import checked_betas
    from mediround.inference.volumes import chat_volume
    from mediround.model.checkpoint import load_checkpoint

    model = load_checkpoint(default_checkpoint()).eval()
    [beta] = checked_betas((), model.config, "shipped")
    write_volume(work / "warm.nii.gz", size, 2)
    chat_volume(model, read_scan(work / "warm.nii.gz"), questions(), work / "warm", ScanOptions(), beta=beta,
                batch_size=batch_size)
    write_volume(work / "scan.nii.gz", size, slices)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
    started = time.perf_counter()
    scan = read_scan(work / "scan.nii.gz")
    chat_volume(model, scan, questions(), work / "out", ScanOptions(), beta=beta, batch_size=batch_size)
    return {"input": scan.intensities.nbytes, "output": int(np.prod(scan.intensities.shape)),
            "peak": (status_kib("VmHWM") - before) * 1024, "seconds": time.perf_counter() - started}


def child(arguments: list[str]) -> None:
    side, size, slices, batch = arguments[0], *map(int, arguments[1:])
    with tempfile.TemporaryDirectory() as work:
        measured = data_side(size, slices, Path(work)) if side == "data" else model_side(size, slices, batch, Path(work))
    print(json.dumps(measured))


def measure(side: str, size: int, slices: int, batch: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", side, str(size), str(slices), str(batch)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--slices", default="30,300")
    parser.add_argument("--batch-sizes", default="16,64")
    args = parser.parse_args()
    counts = [int(n) for n in args.slices.split(",")]
    batches = [int(n) for n in args.batch_sizes.split(",")]
    print(f"{args.size}x{args.size} int16 slices; MiB; extra = peak - input - output")
    print(f"{'side':<6} {'slices':>6} {'batch':>5} {'input':>7} {'output':>7} {'peak':>7} {'extra':>7} {'s':>6}")
    rows = [("data", n, 0) for n in counts] + [("model", n, b) for b in batches for n in counts]
    for side, slices, batch in rows:
        m = measure(side, args.size, slices, batch)
        extra = m["peak"] - m["input"] - m["output"]
        print(f"{side:<6} {slices:>6} {batch or '-':>5} {m['input'] / MIB:>7.1f} {m['output'] / MIB:>7.1f} "
              f"{m['peak'] / MIB:>7.1f} {extra / MIB:>7.1f} {m.get('seconds', 0):>6.1f}", flush=True)


if __name__ == "__main__":
    main()

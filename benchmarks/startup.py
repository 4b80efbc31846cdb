"""Start-up of the command line: wall time of commands that build no model, each in a fresh interpreter.

Run: ``python benchmarks/startup.py [--runs 7] [--source DIR ...]``.

Times ``mediround --help``, ``mediround infer --help``, ``mediround recipes`` and ``mediround --version``
(the median of ``--runs`` runs, each a new process doing what the console script does) and prints them.
Each ``--source`` is a checkout whose code runs (put first on PYTHONPATH; default: this one). With two
sources, e.g. an older commit unpacked by ``git archive REF | tar -x -C /tmp/before``, their runs alternate
and the last column is the first source's time over the second's. The machine's cores are shared: compare
times of one run only.
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

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (["--help"], ["infer", "--help"], ["recipes"], ["--version"])
# What the ``mediround`` console script runs.
ENTRY = "import sys; from mediround_cli.main import cli; sys.exit(cli(prog_name='mediround'))"


def run_seconds(source: Path, args: list[str], folder: Path) -> float:
    """One run from ``folder``: ``python -c`` puts the working folder before PYTHONPATH, so it must hold no
    checkout."""
    paths = [str(source), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", ENTRY, *args], env=env, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="Runs per command and source (the median is printed).")
    parser.add_argument("--source", type=Path, action="append",
                        help="A checkout to run (repeatable; default: this repository).")
    options = parser.parse_args()
    sources = [path.resolve() for path in options.source or [REPO]]
    header = f"{'command':<28}" + "".join(f"{str(source)[-30:]:>32}" for source in sources)
    print(header + ("    ratio" if len(sources) == 2 else ""))
    with tempfile.TemporaryDirectory(prefix="startup-") as folder:
        for args in COMMANDS:
            times: dict[Path, list[float]] = {source: [] for source in sources}
            for _ in range(options.runs):
                for source in sources:  # alternating, so both sides see the same load
                    times[source].append(run_seconds(source, args, Path(folder)))
            medians = [statistics.median(times[source]) for source in sources]
            line = f"{'mediround ' + ' '.join(args):<28}" + "".join(f"{median:>31.2f}s" for median in medians)
            print(line + (f"  {medians[0] / medians[1]:>6.1f}x" if len(sources) == 2 else ""))


if __name__ == "__main__":
    main()

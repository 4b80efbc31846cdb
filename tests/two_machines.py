"""Two simulated machines on one host: one ``mediround`` launcher per machine rank, each with one CPU
process, finding each other over loopback on a free port. Every launcher is stopped, with all its
descendants, when the test is done with it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MACHINES = 2
TIMEOUT_S = 300


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so a process
    group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def kill_machine(process: subprocess.Popen) -> None:
    """SIGKILL a launcher and everything it started: what a machine that dies looks like to the others."""
    for pid in [*descendants(process.pid), process.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


@dataclass
class Machine:
    rank: int
    process: subprocess.Popen
    log: Path

    def finish(self, timeout: float = TIMEOUT_S) -> tuple[int, str]:
        """The exit code and output of this launcher, which must stop within ``timeout`` seconds."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_machine(self.process)
            raise AssertionError(f"machine rank {self.rank} still running after {timeout} s:\n"
                                 f"{self.log.read_text()[-3000:]}") from None
        return code, self.log.read_text()


def finish_all(started: Sequence[Machine]) -> list[str]:
    """Wait for every machine, which must exit 0; returns their outputs."""
    logs = []
    for machine in started:
        code, log = machine.finish()
        assert code == 0, f"machine rank {machine.rank} exited with {code}:\n{log[-3000:]}"
        logs.append(log)
    return logs


@contextmanager
def machines(command: Sequence[str], logs: Path) -> Iterator[list[Machine]]:
    """Start ``mediround COMMAND...`` on two simulated machines (``--cpu --num-processes 1 --num-machines 2``);
    whatever is still running at the end is killed."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    started: list[Machine] = []
    try:
        for rank in range(MACHINES):
            log = logs / f"machine-{rank}.log"
            with open(log, "w") as handle:
                process = subprocess.Popen(
                    [sys.executable, "-m", "mediround_cli.main", *command, "--cpu", "--num-processes", "1",
                     "--num-machines", str(MACHINES), "--machine-rank", str(rank),
                     "--main-process-ip", "127.0.0.1", "--main-process-port", str(port)],
                    env=env, stdout=handle, stderr=subprocess.STDOUT)
            started.append(Machine(rank, process, log))
        yield started
    finally:
        for machine in started:
            if machine.process.poll() is None:
                kill_machine(machine.process)

"""Multi-process launch: the ``train`` command re-launches itself through Accelerate's launcher.

The user never writes ``accelerate launch``. The parent process validates the recipe, then starts
``python -m accelerate.commands.launch ... -m mediround_cli.main <same arguments>`` with two environment
variables: ``MEDIROUND_LAUNCHED`` (so the children run the loop instead of launching again) and
``MEDIROUND_EXPECTED_PROCESSES``. Every child compares the world size it really got with that number
and raises ``LaunchError`` when they differ: Accelerate's ``--cpu --num_processes 2`` silently runs one
process, so CPU runs use ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1`` (gloo) instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from mediround.errors import LaunchError

LAUNCHED_ENV = "MEDIROUND_LAUNCHED"
EXPECTED_ENV = "MEDIROUND_EXPECTED_PROCESSES"
CPU_ENV = "MEDIROUND_LAUNCH_CPU"


@dataclass(frozen=True)
class LaunchPlan:
    """How many processes a run needs, on what, and how the machines find each other."""

    processes_per_machine: int = 1
    cpu: bool = True
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    deepspeed_config: str | None = None
    mixed_precision: str = "no"

    @property
    def world_size(self) -> int:
        return self.processes_per_machine * self.num_machines

    @property
    def needs_launcher(self) -> bool:
        return self.world_size > 1 or self.deepspeed_config is not None


def plan_launch(
    gpus: int | None,
    cpu: bool,
    num_processes: int | None,
    num_machines: int = 1,
    machine_rank: int = 0,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
    deepspeed_config: str | None = None,
    cuda_available: bool | None = None,
) -> LaunchPlan:
    """Turn the command-line launch flags into a plan; contradictory flags raise ``LaunchError``.

    Without ``--gpus`` or ``--cpu`` a machine with CUDA uses one GPU, otherwise one CPU process.
    """
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if gpus is not None and cpu:
        raise LaunchError("--gpus and --cpu exclude each other: use --cpu --num-processes N for CPU processes")
    if gpus is not None and num_processes is not None and gpus != num_processes:
        raise LaunchError(f"--gpus {gpus} and --num-processes {num_processes} disagree: give one of them")
    count = gpus if gpus is not None else (num_processes or 1)
    if count < 1:
        raise LaunchError(f"the number of processes must be at least 1, got {count}")
    on_cpu = cpu or (gpus is None and not cuda_available)
    if not on_cpu and not cuda_available:
        raise LaunchError(f"--gpus {count} asked for GPUs but torch sees no CUDA device; use --cpu")
    if num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise LaunchError(f"--machine-rank {machine_rank} must be in [0, --num-machines {num_machines})")
    if num_machines > 1 and not main_process_ip:
        raise LaunchError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
    if deepspeed_config is not None and on_cpu:
        raise LaunchError("--deepspeed needs GPUs (--gpus N)")
    if deepspeed_config is not None and not os.path.isfile(deepspeed_config):
        raise LaunchError(f"--deepspeed: file not found: {deepspeed_config}")
    return LaunchPlan(
        processes_per_machine=count,
        cpu=on_cpu,
        num_machines=num_machines,
        machine_rank=machine_rank,
        main_process_ip=main_process_ip,
        main_process_port=main_process_port,
        deepspeed_config=deepspeed_config,
    )


def is_launched_child() -> bool:
    """True inside a process started by ``relaunch`` (it must run the loop, not launch again)."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def expected_world_size(plan: LaunchPlan | None = None) -> int:
    """The world size this process must see: set by the parent, or by torchrun, or 1."""
    if EXPECTED_ENV in os.environ:
        return int(os.environ[EXPECTED_ENV])
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return plan.world_size if plan is not None else 1


def launched_on_cpu(plan: LaunchPlan) -> bool:
    """Whether this process must run on CPU (the parent's decision wins inside a child)."""
    if CPU_ENV in os.environ:
        return os.environ[CPU_ENV] == "1"
    return plan.cpu


def accelerate_command(plan: LaunchPlan, module_args: Sequence[str]) -> list[str]:
    """The ``accelerate launch`` command line that runs ``python -m mediround_cli.main <module_args>``."""
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if plan.deepspeed_config is not None:
        command += ["--use_deepspeed", "--deepspeed_config_file", plan.deepspeed_config]
    else:
        command += ["--multi_gpu"]
    command += [
        "--num_processes", str(plan.world_size),
        "--num_machines", str(plan.num_machines),
        "--machine_rank", str(plan.machine_rank),
        "--mixed_precision", plan.mixed_precision,
        "--dynamo_backend", "no",
    ]
    if plan.main_process_ip:
        command += ["--main_process_ip", plan.main_process_ip]
    if plan.main_process_port is not None:
        command += ["--main_process_port", str(plan.main_process_port)]
    if plan.cpu:
        command += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // plan.world_size))]
    return command + ["-m", "mediround_cli.main", *module_args]


def launch_environment(plan: LaunchPlan) -> dict[str, str]:
    """The environment of the launched children."""
    env = dict(os.environ)
    env[LAUNCHED_ENV] = "1"
    env[EXPECTED_ENV] = str(plan.world_size)
    env[CPU_ENV] = "1" if plan.cpu else "0"
    if plan.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def relaunch(plan: LaunchPlan, module_args: Sequence[str]) -> None:
    """Run the command again under Accelerate's launcher and wait; a failed child raises ``LaunchError``.

    Ctrl-C reaches the children directly (same process group); this process keeps waiting so that they
    can write their interrupt checkpoint.
    """
    command = accelerate_command(plan, module_args)
    process = subprocess.Popen(command, env=launch_environment(plan))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    if code != 0:
        raise LaunchError(
            f"training processes exited with code {code} ({plan.world_size} process(es) via accelerate launch); "
            "see their messages above"
        )


def check_world_size(actual: int, expected: int, rank: int) -> None:
    """Fail loudly when this process is not part of the world size that was asked for."""
    if actual != expected:
        raise LaunchError(
            f"process rank {rank} sees a world size of {actual} but {expected} process(es) were asked for; "
            "refusing to train (for CPU use --cpu --num-processes N, which launches gloo DDP)"
        )

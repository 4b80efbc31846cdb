"""Multi-process launch: ``train``, ``train-jcm`` and ``infer`` re-launch themselves through Accelerate's launcher.

The user never writes ``accelerate launch``. The parent process validates the recipe, then starts
``python -m accelerate.commands.launch ... -m mediround_cli.main <same arguments>`` with two environment
variables: ``MEDIROUND_LAUNCHED`` (so the children run the loop instead of launching again) and
``MEDIROUND_EXPECTED_PROCESSES``. Every child compares the world size it really got with that number
and raises ``LaunchError`` when they differ: Accelerate's ``--cpu --num_processes 2`` silently runs one
process, so CPU runs use ``--multi_gpu`` with ``ACCELERATE_USE_CPU=1`` (gloo) instead.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mediround.errors import LaunchError

LAUNCHED_ENV = "MEDIROUND_LAUNCHED"
EXPECTED_ENV = "MEDIROUND_EXPECTED_PROCESSES"
CPU_ENV = "MEDIROUND_LAUNCH_CPU"
STOP_FILE_ENV = "MEDIROUND_STOP_FILE"
DEEPSPEED_ENV = "MEDIROUND_DEEPSPEED_CONFIG"
DEEPSPEED_INSTALL = "pip install -e \".[deepspeed]\" (or pip install deepspeed)"


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
        # Imported here so that light commands (eval of a predictions folder) can plan without torch.
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
    if deepspeed_config is not None and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(f"--deepspeed needs the optional deepspeed package: {DEEPSPEED_INSTALL}")
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


def launched_deepspeed_config() -> str | None:
    """The DeepSpeed config file of this launched child (None: plain DDP or one process)."""
    return os.environ.get(DEEPSPEED_ENV) or None


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
    if plan.deepspeed_config is not None:
        env[DEEPSPEED_ENV] = plan.deepspeed_config
        if plan.cpu:
            # Accelerate refuses --cpu with --use_deepspeed; DeepSpeed's own CPU accelerator runs over gloo.
            env["DS_ACCELERATOR"] = "cpu"
    elif plan.cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def relaunch(plan: LaunchPlan, module_args: Sequence[str], stop_file: str | os.PathLike | None = None) -> None:
    """Run the command again under Accelerate's launcher and wait; a failed child raises ``LaunchError``.

    Without ``stop_file``, Ctrl-C reaches the children directly (same process group) and this process
    keeps waiting. With ``stop_file``, the launcher runs in its own session so that Ctrl-C never reaches
    torch's elastic agent (which would answer it with a traceback and SIGTERM to the workers): the first
    Ctrl-C creates ``stop_file`` instead, which the workers poll after every step (``STOP_FILE_ENV``);
    a second Ctrl-C terminates the launcher.
    """
    command = accelerate_command(plan, module_args)
    env = launch_environment(plan)
    if stop_file is not None:
        Path(stop_file).unlink(missing_ok=True)
        env[STOP_FILE_ENV] = str(stop_file)
    process = subprocess.Popen(command, env=env, start_new_session=stop_file is not None)
    interrupts = 0

    def on_interrupt(signum: int, frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if stop_file is not None and interrupts == 1:
            Path(stop_file).parent.mkdir(parents=True, exist_ok=True)
            Path(stop_file).touch()
        elif stop_file is not None:
            process.terminate()

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
        if stop_file is not None:
            Path(stop_file).unlink(missing_ok=True)
    if code != 0:
        raise LaunchError(
            f"training processes exited with code {code} ({plan.world_size} process(es) via accelerate launch); "
            "see their messages above"
        )


def stop_requested() -> bool:
    """True when the launching process asked the workers to checkpoint and stop (its first Ctrl-C)."""
    path = os.environ.get(STOP_FILE_ENV)
    return bool(path) and os.path.exists(path)


def check_world_size(actual: int, expected: int, rank: int) -> None:
    """Fail loudly when this process is not part of the world size that was asked for."""
    if actual != expected:
        raise LaunchError(
            f"process rank {rank} sees a world size of {actual} but {expected} process(es) were asked for; "
            "refusing to train (for CPU use --cpu --num-processes N, which launches gloo DDP)"
        )

"""Several processes, on one machine or several: the re-launched workers of a run and their launcher.

The parent writes the plan (``DIR/.parts/plan.json``) and re-launches ``mediround infer --worker-plan``
as this machine's workers (``launch_workers``). Global rank 0 reads the plan and broadcasts it over gloo,
so every worker, on every machine, predicts its shard from the same plan (``run_worker``); then they wait
for each other (a barrier). Machines of rank > 0 only launch their workers (``join_inference``); machine
rank 0 merges once every shard's completion mark is there, and otherwise names the shards that did not
complete and merges nothing. ``DIR`` must be one folder shared by every machine (a network file system),
and the data and model must be at the same paths everywhere: workers of other machines refuse data or a
model whose SHA-256 differs from machine rank 0's.
"""

from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from mediround.atomic import write_json
from mediround.data.formats import load_dialogues
from mediround.data.run_manifest import MANIFEST_FILE
from mediround.errors import DataError, LaunchError
from mediround.inference.checkpoint_policy import load_model
from mediround.inference.events import InferenceEvents
from mediround.inference.outputs import part_root, parts_root
from mediround.inference.plan import Plan, check_settings, run_settings
from mediround.inference.settings import InferenceConfig
from mediround.inference.sharding import PROGRESS_FILE, missing_shards, run_shard
from mediround.launch import LaunchPlan, join_process_group, plan_launch, relaunch
from mediround.model.load_report import LoadReport

WORKER_PLAN_FILE = "plan.json"
# A network file system may show another machine's new file only after its attribute cache expires
# (NFS: acdirmax, 60 s by default), so rank 0 looks that long for marks that its barrier says exist.
SHARED_FOLDER_LAG_S = 60.0


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _launch_plan(config: InferenceConfig) -> LaunchPlan:
    return plan_launch(
        gpus=None if config.device == "cpu" else config.num_processes,
        cpu=config.device == "cpu",
        num_processes=config.num_processes,
        num_machines=config.num_machines,
        machine_rank=config.machine_rank,
        main_process_ip=config.main_process_ip,
        main_process_port=config.main_process_port,
    )


def _relaunch_workers(config: InferenceConfig, launch: LaunchPlan, events: InferenceEvents) -> None:
    """Re-launch ``mediround infer --worker-plan`` as this machine's processes of ``launch`` and wait;
    ``events`` hears the number of dialogues finished in every part folder."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            events.progressed(sum(_count_lines(p / PROGRESS_FILE) for p in parts_root(config).glob("rank-*")))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        relaunch(launch, ["infer", "--worker-plan", str(parts_root(config) / WORKER_PLAN_FILE)]
                 + (["--allow-partial-load"] if config.allow_partial_load else []))
    finally:
        stop.set()
        watcher.join()


def launch_workers(config: InferenceConfig, plan: Plan, events: InferenceEvents) -> None:
    """Write the plan (config, the indices to predict, the run manifest), re-launch this machine's workers
    and wait until every shard, on every machine, has its completion mark.

    The workers never re-plan or merge; this process merges after they exit. A shard without its mark
    (its process failed, its machine stopped, or its machine writes into another folder) is named in a
    ``LaunchError`` and nothing is merged.
    """
    launch = _launch_plan(config)
    manifest = json.loads((Path(config.out) / MANIFEST_FILE).read_text(encoding="utf-8"))
    write_json(parts_root(config) / WORKER_PLAN_FILE, {"config": config.to_dict(), "todo": plan.todo,
                                                       "manifest": manifest})
    try:
        _relaunch_workers(config, launch, events)
    except LaunchError as error:
        # A process may fail after its shard is complete (e.g. it gave up waiting for a slower machine):
        # with every mark there, the predictions are whole and are merged.
        if missing_shards(config, launch.world_size):
            raise LaunchError(_incomplete_message(config, plan, launch, "did not complete: its process failed "
                                                  "or its machine stopped (see that machine's messages)")) from error
        return
    # The barrier passed, so every worker finished its shard: a missing mark was written where this machine
    # cannot see it (yet).
    deadline = time.monotonic() + min(SHARED_FOLDER_LAG_S, config.shard_timeout)
    while missing_shards(config, launch.world_size) and time.monotonic() < deadline:
        time.sleep(1.0)
    if missing_shards(config, launch.world_size):
        raise LaunchError(_incomplete_message(
            config, plan, launch, f"finished, but its files are not in {parts_root(config)} as this machine sees "
            "it: the output folder must be one folder shared by every machine (a network file system), at the "
            "same path"))


def _incomplete_message(config: InferenceConfig, plan: Plan, launch: LaunchPlan, reason: str) -> str:
    """One line per shard without its completion mark, then what was kept and how to go on."""
    world = launch.world_size
    lines = []
    for rank in missing_shards(config, world):
        part = part_root(config, rank)
        lines.append(f"shard rank-{rank} of {world} (machine rank {launch.machine_of_rank(rank)}) {reason}; "
                     f"{_count_lines(part / PROGRESS_FILE)} of its {len(plan.todo[rank::world])} dialogue(s) "
                     f"done in {part}")
    return "\n".join(lines) + ("\nnothing was merged into the predictions folder: run the same command with "
                               "--resume (on every machine) to keep the finished dialogues and predict the rest")


def join_inference(config: InferenceConfig, events: InferenceEvents | None = None) -> None:
    """Machine rank > 0 of a multi-machine run: launch this machine's workers, which predict their shards
    of the plan that machine rank 0 makes (and broadcasts), and wait. Machine rank 0 merges."""
    _relaunch_workers(config, _launch_plan(config), events or InferenceEvents())


def _read_worker_plan(plan_file: str | os.PathLike) -> dict:
    try:
        with open(plan_file, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(str(plan_file), None, None, f"unreadable worker plan: {error}") from None


def run_worker(plan_file: str | os.PathLike) -> list[LoadReport]:
    """The body of one re-launched worker: predict its shard of the plan and wait for the other shards;
    returns the load reports of its model.

    Global rank 0 reads ``plan_file`` (written by ``launch_workers`` on its machine) and broadcasts it,
    so the other machines need neither the file nor a plan of their own. Their workers check that their
    data and model are those machine rank 0 planned with.
    """
    rank, world = join_process_group()
    shared = [_read_worker_plan(plan_file) if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    saved = shared[0]
    config = InferenceConfig.from_dict(saved["config"], str(plan_file))
    # Set by torchrun (Accelerate's launcher) in every worker: the rank of this worker's machine.
    machine_rank = int(os.environ.get("GROUP_RANK", "0"))
    # One check per other machine (its first process): the hashes read every data file and image.
    loaded = load_dialogues(config.data, root=config.root, allow_outside_root=config.allow_outside_root)
    if machine_rank > 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        check_settings(run_settings(config, loaded.dialogues), saved["manifest"], config.data,
                       f"machine rank {machine_rank} sees other data or another model than machine rank 0")
    if config.device != "cpu":
        config.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    plan = Plan(loaded.dialogues, loaded.problems, saved["todo"], 0, loaded.format)
    model = load_model(config)
    run_shard(config, plan, model, rank=rank, world=world, machine_rank=machine_rank)
    # Every worker waits for every other: a process that failed or whose machine stopped makes this raise
    # (at once when its connection closes, else after shard_timeout), so machine rank 0 never merges early.
    dist.monitored_barrier(timeout=timedelta(seconds=config.shard_timeout), wait_all_ranks=True)
    dist.destroy_process_group()
    return list(model.load_reports)

"""``mediround infer``: predict masks round by round, chaining the model's own masks (Algorithm 1)."""

from __future__ import annotations

import os
from pathlib import Path

import click

from mediround.data.run_manifest import default_predictions_folder
from mediround.default_model import default_checkpoint, default_model_notice
from mediround.inference import DEFAULT_BATCH_SIZE, DEFAULT_BETA
from mediround_cli.common import console, err_console, exit_skipped, handle_errors
from mediround_cli.output import (
    inference_summary_table,
    jcm_rounds_option,
    launch_settings,
    machine_options,
    parse_beta,
    predict_this_machines_shards,
    prediction_progress,
    print_report,
    shard_timeout_option,
    write_folder_report,
)
from mediround_cli.partial_load import allow_partial_load_option, print_load_reports


@click.command(epilog="""\b
Examples:
  mediround infer dialogues.jsonl --beta 0.6            # writes ./dialogues-predictions/
  mediround infer dialogues.jsonl --model runs/x/model --gpus 4 --out preds --report --resume
  mediround infer dialogues.jsonl --gpus 8 --num-machines 2 --machine-rank $SLURM_NODEID --main-process-ip node01 --out /shared/preds""")
@click.argument("data", required=False, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder (from `mediround train` / `train-jcm`) [default: the shipped tiny model].")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Predictions folder to write [default: ./DATA_NAME-predictions, e.g. dialogues-predictions].")
@click.option("--beta", default=None, metavar="BETA|off",
              help="JCM threshold: q > BETA decodes the raw [SEG], otherwise the refined one; 'off' disables "
                   f"JCM. [default: {DEFAULT_BETA:g} when the checkpoint has trained JCM weights, else off]")
@machine_options
@shard_timeout_option
@click.option("--resume", is_flag=True, help="Keep the dialogues already complete in --out and predict the rest.")
@click.option("--overwrite", is_flag=True, help="Replace an earlier run's predictions in --out.")
@click.option("--generate", is_flag=True,
              help="Let the model write its answers (greedy) and keep them in the history, instead of "
                   "feeding the dialogue's own answers.")
@click.option("--no-cache", is_flag=True,
              help="Re-run the whole model (image encoders included) for every round, as the authors do.")
@jcm_rounds_option
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Dialogues that advance together, round by round, sharing each forward pass.")
@click.option("--overlays", is_flag=True, help="Write one PNG per dialogue under OUT/overlays/.")
@click.option("--report", is_flag=True,
              help="Write OUT/report.html: the scores and each dialogue's rounds and overlay (as `demo` does).")
@click.option("--root", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder that image and mask paths are relative to [default: the data file's folder].")
@click.option("--allow-outside-root", is_flag=True, help="Accept image/mask paths that leave the root.")
@allow_partial_load_option
# Read by global rank 0 only (the other machines get the plan from it): not checked here.
@click.option("--worker-plan", type=click.Path(dir_okay=False), hidden=True)
@handle_errors
def infer(
    data: Path | None,
    model_path: Path | None,
    out: Path | None,
    beta: str | None,
    gpus: int | None,
    cpu: bool,
    num_processes: int | None,
    num_machines: int,
    machine_rank: int,
    main_process_ip: str | None,
    main_process_port: int | None,
    shard_timeout: float,
    resume: bool,
    overwrite: bool,
    generate: bool,
    no_cache: bool,
    jcm_rounds: str | None,
    batch_size: int,
    overlays: bool,
    report: bool,
    root: Path | None,
    allow_outside_root: bool,
    allow_partial_load: bool,
    worker_plan: str | None,
) -> None:
    """Predict every round of DATA (JSONL, MR-MedSeg JSON or an SA-Med2D folder), chaining predicted masks.

    Writes the predictions folder (predictions.jsonl, masks/, errors.jsonl, the run manifest run.json and,
    when DATA has ground truth, metrics.parquet). Exits 3 when any dialogue was skipped."""
    # The runner pulls in torch: imported here so that `mediround infer --help` stays fast.
    from mediround.inference.runner import run_inference
    from mediround.inference.settings import InferenceConfig
    from mediround.inference.workers import run_worker
    from mediround.reports.scoring import score_run

    if worker_plan is not None:
        reports = run_worker(worker_plan)
        if allow_partial_load and os.environ.get("RANK", "0") == "0":
            print_load_reports(reports)
        return
    if data is None:
        raise click.UsageError("DATA is required")
    out = out or default_predictions_folder(data)
    if model_path is None:
        model_path = default_checkpoint()
        err_console.print(default_model_notice(model_path), soft_wrap=True)
    launch = launch_settings(gpus, cpu, num_processes, num_machines, machine_rank, main_process_ip, main_process_port)
    config = InferenceConfig.from_dict({
        "data": str(data), "model": str(model_path), "out": str(out),
        "betas": () if beta is None else (parse_beta(beta),), "generate": generate, "use_cache": not no_cache,
        "jcm_rounds": jcm_rounds, "batch_size": batch_size, "resume": resume, "overwrite": overwrite,
        "overlays": overlays or report, "root": None if root is None else str(root),
        "allow_outside_root": allow_outside_root, "allow_partial_load": allow_partial_load,
        "shard_timeout": shard_timeout, **launch,
    }, "the command line")
    if config.machine_rank > 0:
        predict_this_machines_shards(config, "infer")
        return
    with prediction_progress("infer") as events:
        summary = run_inference(config, events=events)
    config = summary.config
    if allow_partial_load and summary.load_reports:
        print_load_reports(summary.load_reports)
    evaluations = score_run(config.data, config.track_folders, config.out, config.root, config.allow_outside_root)
    for label, evaluation in evaluations.items():
        if len(evaluations) > 1:
            console.print(f"[bold]{label}[/bold]")
        print_report(evaluation.summary, evaluation.missing, per_round=True)
    console.print(inference_summary_table(summary))
    if config.betas == (None,):
        console.print("JCM off" + ("" if beta is not None else ": the checkpoint has no trained JCM weights"))
    if report:
        for label, folder in summary.folders.items():
            rows = evaluations[label].rows if label in evaluations else []
            page = write_folder_report(folder, config.data, config.root, config.allow_outside_root, rows)
            console.print(f"report: {page}", soft_wrap=True)
    exit_skipped(summary.skipped, "dialogue(s)", summary.errors_file)

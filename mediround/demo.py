"""``mediround demo`` as a library call: a fresh synthetic test set, the shipped model with JCM, a report.

The demo draws ``n_dialogues`` dialogues of the synthetic benchmark's test split with its own seed (the
shipped model was trained on the train split of seed 0, so none of them was seen in training), runs
Algorithm 1 with JCM at ``beta`` (``mediround.inference``), scores every round, and writes::

    OUT/demo.json                the settings and where everything is
    OUT/data/test.jsonl          the dialogues, images/ and masks/
    OUT/predictions/             predictions.jsonl, masks/, overlays/ (one PNG per dialogue), metrics.parquet
    OUT/rounds.parquet           one metric row per round (with the beta and reference columns)
    OUT/round_curve.png          Dice and cIoU per round
    OUT/index.html               the summary tables and every dialogue's rounds (query, overlay, Dice)
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from mediround.atomic import write_json
from mediround.data.formats import load_dialogues
from mediround.data.synth import Wording, generate
from mediround.default_model import default_checkpoint
from mediround.errors import DataError
from mediround.inference import DEFAULT_BETA
from mediround.inference.checkpoint_policy import model_folder
from mediround.inference.events import InferenceEvents
from mediround.inference.model_eval import ModelEvalConfig, ModelEvaluation, evaluate_model
from mediround.inference.settings import InferenceConfig
from mediround.reports.html import write_predictions_report
from mediround.reports.scoring import EvalConfig

MARKER_FILE = "demo.json"
DEFAULT_DEMO_SEED = 2026
DEMO_PHRASINGS = "a"
"""The template half the shipped model was trained on (recipes/default-tiny.yaml): the demo shows the model on
wording it knows; docs/learning.md measures it on the other half."""
"""Any seed draws unseen dialogues (training used the train split); a fixed one makes the demo repeatable."""


@dataclass
class DemoConfig:
    """What the demo draws and runs. ``model`` None means the shipped checkpoint; ``beta`` None turns JCM off."""

    out: Path
    n_dialogues: int = 12
    seed: int = DEFAULT_DEMO_SEED
    beta: float | None = DEFAULT_BETA
    model: Path | None = None
    image_size: int = 128
    device: str = "cpu"
    phrasings: str = DEMO_PHRASINGS


@dataclass
class DemoResult:
    """The files the demo wrote and the scored evaluation (``mediround.inference.model_eval``)."""

    config: DemoConfig
    model: Path
    data: Path
    predictions: Path
    rounds: Path
    round_plot: Path
    index: Path
    evaluation: ModelEvaluation


def prepare_output(out: Path) -> None:
    """Refuse a non-empty folder that no demo wrote; empty one that an earlier demo wrote."""
    if out.exists() and not out.is_dir():
        raise DataError(str(out), None, None, "the demo output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER_FILE).is_file():
            raise DataError(str(out), None, None, "folder is not empty and holds no earlier demo; choose another --out")
        for name in ("data", "predictions", "rounds.parquet", "round_curve.png", "index.html", MARKER_FILE):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def run_demo(config: DemoConfig, events: InferenceEvents | None = None) -> DemoResult:
    """Generate, predict, score and report into ``config.out`` (see the module docstring); ``events``
    follows the inference run."""
    out = Path(config.out)
    model = model_folder(config.model) if config.model is not None else default_checkpoint()
    prepare_output(out)
    data = generate(out / "data", config.n_dialogues, config.seed, split="test", image_size=config.image_size,
                    wording=Wording(phrasings=config.phrasings)).files["test"]
    predictions = out / "predictions"
    inference = InferenceConfig(data=str(data), model=str(model), out=str(predictions), betas=(config.beta,),
                                overlays=True, device=config.device)
    rounds, round_plot = out / "rounds.parquet", out / "round_curve.png"
    evaluation = evaluate_model(ModelEvalConfig(inference, EvalConfig(out=rounds, plot=round_plot)),
                                events=events)
    dialogues = load_dialogues(data).dialogues
    jcm = "JCM off" if config.beta is None else f"JCM at beta {config.beta:g}"
    notes = [
        (f"Model: {model}. {len(dialogues)} synthetic test dialogues (seed {config.seed}, template half "
         f"{config.phrasings!r}), {jcm}, each round's reference mask taken from the model's own earlier prediction "
         "(Algorithm 1)."),
        "Overlays: predicted mask orange, ground truth green. Scores x100.",
    ]
    index = write_predictions_report(out / "index.html", predictions, dialogues, evaluation.rows, "MediRound demo",
                                     notes, figures=[("Dice and cIoU per round", round_plot.name)])
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(config).items()}
    write_json(out / MARKER_FILE, {"settings": settings, "model": str(model), "data": str(data),
                                   "predictions": str(predictions), "rounds": str(rounds), "index": str(index)})
    return DemoResult(config, model, Path(data), predictions, rounds, round_plot, index, evaluation)


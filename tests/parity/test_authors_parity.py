"""Our side of benchmarks/authors_parity.py against the authors' outputs stored in ``fixture/``.

The fixture was written by ``python benchmarks/authors_parity.py --write-fixture`` from a run of the
authors' own code (never by hand). This test rebuilds the same random weights from the stored seed,
checks their checksum, converts them with ``mediround convert-llava``, runs our model and recomputes
every quantity; each must come out as the last full run recorded it (within tolerance, or differing by
the same amount, to three significant digits), so a change to any compared computation fails here
without the reference environment. After a deliberate change, rerun the script with --write-fixture.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixture"


def _harness():
    spec = importlib.util.spec_from_file_location("authors_parity", REPO / "benchmarks" / "authors_parity.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def our_side(tmp_path_factory):
    """The harness, our model built from the regenerated weights after ``compare`` (its forward and backward
    ran: the gradients are on the model), that comparison's report and the recorded results. A test that
    changes the model (``compare_step`` steps it) runs last in this module."""
    harness = _harness()
    tmp_path = tmp_path_factory.mktemp("parity")
    recorded = json.loads((FIXTURE / "authors.json").read_text())
    assert harness.SEED == recorded["seed"]
    checksum = harness.write_weights(tmp_path, recorded["seed"])
    assert checksum == recorded["weights_sha256"], "the weight generator changed: rerun the script with --write-fixture"
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(FIXTURE / name, tmp_path / "llava" / name)
    harness.convert(tmp_path)
    model = harness.our_model(tmp_path)
    report = harness.Report()
    harness.compare(tmp_path, model, load_file(str(FIXTURE / "authors.safetensors")), recorded, report)
    return harness, tmp_path, model, report, recorded


def _changed(results: dict, recorded: dict) -> dict:
    return {
        name: (result, recorded[name])
        for name, result in results.items()
        if result["ok"] != recorded[name]["ok"] or (not result["ok"] and result["detail"] != recorded[name]["detail"])
    }


@pytest.mark.slow
def test_our_side_reproduces_the_recorded_parity(our_side):
    _, _, _, report, recorded = our_side
    assert set(report.results) == set(recorded["results"])
    changed = _changed(report.results, recorded["results"])
    assert not changed, f"compared computations changed since the fixture was written: {changed}"


@pytest.mark.slow
def test_our_evaluation_and_optimizer_step_reproduce_the_recorded_parity(our_side):
    """Items 3-4 against ``fixture/authors_eval.*``: the chained evaluation (mask logits, references, Dice /
    gIoU / cIoU) and every trainable tensor after one AdamW step (mask-decoder tensors every
    ``MASK_DECODER_STRIDE``-th element, as recorded for them)."""
    harness, work, model, _, parity = our_side
    recorded = json.loads((FIXTURE / f"{harness.EVAL_FILE}.json").read_text())
    authors = load_file(str(FIXTURE / f"{harness.EVAL_FILE}.safetensors"))
    report = harness.Report()
    harness.compare_evaluation(work, model, authors, recorded, report)
    harness.compare_step(model, authors, recorded, parity["added_token_ids"], report, harness.MASK_DECODER_STRIDE)
    assert set(report.results) == set(recorded["results"])
    changed = _changed(report.results, recorded["results"])
    assert not changed, f"compared computations changed since the fixture was written: {changed}"

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


@pytest.mark.slow
def test_our_side_reproduces_the_recorded_parity(tmp_path, capsys):
    harness = _harness()
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
    assert set(report.results) == set(recorded["results"])
    changed = {
        name: (result, recorded["results"][name])
        for name, result in report.results.items()
        if result["ok"] != recorded["results"][name]["ok"]
        or (not result["ok"] and result["detail"] != recorded["results"][name]["detail"])
    }
    assert not changed, f"compared computations changed since the fixture was written: {changed}"

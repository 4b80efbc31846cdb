"""Start-up: listing the commands, the recipes commands, ``app --help`` and reading or validating recipes
import no part of the model stack (torch, transformers, peft, accelerate, segment-anything) nor gradio.
Asserted on the imports of a fresh interpreter, not on time; benchmarks/startup.py measures the wall time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("torch", "transformers", "peft", "accelerate", "segment_anything", "gradio")
"""The model stack, and gradio (``mediround app``'s optional extra, a few seconds of imports itself)."""

# Runs the code paths in a fresh interpreter, then prints which heavy packages it imported. Each CLI call
# runs as the console script would (click's standalone mode, SystemExit caught), so a command module
# that imports torch at its top shows here.
LIGHT_PATHS = textwrap.dedent("""
    import json, sys
    from pathlib import Path

    from mediround_cli.main import cli

    outputs = {}
    for args in (["--help"], ["--version"], ["recipes"], ["recipes", "--help"],
                 ["recipes", "show", "mediround-7b-4gpu"], ["app", "--help"]):
        try:
            cli.main(args, prog_name="mediround")
        except SystemExit as stop:
            assert stop.code == 0, (args, stop.code)

    from mediround.default_model import default_checkpoint
    from mediround.training.recipe import load_jcm_recipe, load_recipe

    dialogues = Path(sys.argv[1])
    dialogues.write_text("")
    data = [f"data.train={dialogues}", f"data.val={dialogues}"]
    stage1 = load_recipe("tiny-cpu", data)
    paper = load_recipe("mediround-7b-4gpu", require_data=False)
    stage2 = load_jcm_recipe("jcm-tiny-cpu", [*data, f"model={default_checkpoint()}"])
    checked = [stage1.model_preset, paper.model_preset, stage2.jcm.beta]
    print(json.dumps({"checked": checked, "heavy": sorted(set(sys.argv[2:]) & set(sys.modules))}))
""")


def test_help_version_recipes_and_recipe_validation_import_no_model_stack(tmp_path):
    run = subprocess.run([sys.executable, "-c", LIGHT_PATHS, str(tmp_path / "train.jsonl"), *HEAVY],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["checked"] == ["tiny", "llava-med-7b", 0.6]  # the recipes were really read and validated
    assert report["heavy"] == []


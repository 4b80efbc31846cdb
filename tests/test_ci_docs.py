"""docs/ci.md's workflows run what the project's own CI runs: the mediround commands of the documented
GitHub Actions workflow and GitLab CI job are the ones `.ci/run` runs on the shipped model, before pytest."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CI_DOC = ROOT / "docs" / "ci.md"
CI_RUN = ROOT / ".ci" / "run"
GITHUB_WORKFLOW = ".github/workflows/mediround-gate.yml"
GITLAB_CI = ".gitlab-ci.yml"


def _documented_yaml() -> dict[str, dict]:
    """The YAML blocks of docs/ci.md, parsed, by the file name their first line names (``# FILE``)."""
    blocks = re.findall(r"```yaml\n(.*?)```", CI_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    named = {}
    for block in blocks:
        first = block.splitlines()[0]
        assert first.startswith("# "), f"a YAML block of {CI_DOC} does not name its file: {first}"
        named[first[2:].strip()] = yaml.safe_load(block)
    return named


def _commands(script: str) -> list[list[str]]:
    """The ``mediround`` commands of a shell script, continuation lines joined, as argument lists."""
    joined = re.sub(r"\\\n\s*", " ", script)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.strip().startswith("mediround ")]


def _ci_run_gate() -> list[list[str]]:
    """The commands .ci/run runs on the shipped model: those after the one that makes its data (``synth``)."""
    commands = _commands(CI_RUN.read_text(encoding="utf-8"))
    synth = next(index for index, command in enumerate(commands) if command[1] == "synth")
    return commands[synth + 1:]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.fixture(scope="module")
def documented() -> dict[str, dict]:
    return _documented_yaml()


def test_the_github_workflow_runs_the_commands_of_ci_run(documented):
    workflow = documented[GITHUB_WORKFLOW]
    [job] = workflow["jobs"].values()
    steps = job["steps"]
    commands = [command for step in steps if "run" in step for command in _commands(step["run"])]
    assert commands == _ci_run_gate()
    infer, evaluate = commands
    assert infer[:2] == ["mediround", "infer"] and "--cpu" in infer
    assert evaluate[:2] == ["mediround", "eval"] and _option(evaluate, "--summary-md") == "$GITHUB_STEP_SUMMARY"
    assert _option(evaluate, "--predictions") == _option(infer, "--out")
    assert _option(evaluate, "--junit-xml").startswith("$REPORT_DIR/")
    # Variables: the workflow sets each one the commands use (GitHub sets the step summary), as .ci/run does.
    used = set(re.findall(r"\$(\w+)", " ".join(" ".join(command) for command in commands))) - {"GITHUB_STEP_SUMMARY"}
    assert used <= set(workflow["env"])
    ci_run = CI_RUN.read_text(encoding="utf-8")
    assert all(re.search(rf"\b{name}=", ci_run) for name in used)
    # CPU torch from PyTorch's index, the model folder cached, the report folder uploaded even on a failure.
    installs = " ".join(step.get("run", "") for step in steps)
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs
    cached = [step for step in steps if step.get("uses", "").startswith("actions/cache@")]
    assert [step["with"]["path"] for step in cached] == ["${{ env.MODEL_DIR }}"]
    [upload] = [step for step in steps if step.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["if"] == "always()" and upload["with"]["path"] == "${{ env.REPORT_DIR }}"
    [gate_step] = [step for step in steps if "mediround eval" in step.get("run", "")]
    assert gate_step["if"] == "success() || failure()"  # the reports are written when infer skipped dialogues too


def test_the_gitlab_job_runs_the_same_commands_with_its_summary_in_the_report_folder(documented):
    """GitLab has no step summary: the job writes the Markdown into the report folder, its one difference."""
    pipeline = documented[GITLAB_CI]
    [job] = [value for value in pipeline.values() if isinstance(value, dict) and "script" in value]
    commands = _commands("\n".join(job["script"]))
    expected = _ci_run_gate()
    expected[-1][expected[-1].index("--summary-md") + 1] = "$REPORT_DIR/summary.md"
    assert commands == expected
    assert set(re.findall(r"\$(\w+)", " ".join(job["script"]))) <= set(pipeline["variables"]) | set(job.get("variables", {}))
    assert "--index-url https://download.pytorch.org/whl/cpu" in " ".join(job["before_script"])
    reports = job["artifacts"]["reports"]["junit"]
    assert job["artifacts"]["when"] == "always" and reports == f"{pipeline['variables']['REPORT_DIR']}/junit.xml"
    assert job["cache"]["paths"] == [pipeline["variables"]["MODEL_DIR"]]


def test_ci_run_gates_the_shipped_model_before_pytest():
    lines = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines() if line.strip()]
    evaluate = next(index for index, line in enumerate(lines) if line.startswith("mediround eval"))
    assert lines[-1].startswith("python -m pytest") and evaluate < len(lines) - 1
    assert "MODEL_DIR=mediround/assets/default-model" in CI_RUN.read_text(encoding="utf-8")
    assert "BASELINE=baselines/ci-eval.parquet" in CI_RUN.read_text(encoding="utf-8")

"""benchmarks/paper_path_rehearsal.py runs the commands the docs show: each of its command lines, in its GPU
form, is a line of docs/real-weights.md, the README's reproduce sequence is among them, and the rehearsal
changes a docs line only by the CPU launch and appended sizes and output paths. No model is run."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTRA_OPTIONS = {"--predictions-out", "--overwrite"}
"""The only options the rehearsal appends to a docs line (beside KEY=VALUE overrides): where eval writes
its predictions, and leave to replace an earlier rehearsal's."""


def rehearsal():
    spec = importlib.util.spec_from_file_location("paper_path_rehearsal", REPO / "benchmarks" / "paper_path_rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the script's dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def command_lines(markdown: str) -> list[str]:
    """Every ``mediround ...`` line of the markdown's bash blocks, comments and line continuations removed."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("mediround "):
                lines.append(" ".join(line.split()))
    return lines


def test_every_rehearsed_command_is_a_line_of_real_weights_md():
    module = rehearsal()
    docs = command_lines((REPO / "docs" / "real-weights.md").read_text())
    steps = [step for recipe in module.RECIPES for step in module.sequence(recipe)]
    assert len(steps) == 14
    missing = [step.docs for step in steps if step.docs not in docs]
    assert not missing, f"rehearsed but not in docs/real-weights.md: {missing}"


def test_the_readme_reproduce_sequence_is_rehearsed():
    module = rehearsal()
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Training the real model**"):]
    sequence = command_lines(section[: section.index("## Documentation")])
    assert [line.split()[1] for line in sequence] == ["train", "train-jcm", "eval"]
    rehearsed = {step.docs for step in module.sequence("4gpu")}
    for line in sequence:
        assert line.replace(" DATA ", f" {module.DATA}/val.json ") in rehearsed, line


def test_a_rehearsed_command_differs_from_its_docs_line_only_by_the_cpu_launch_sizes_and_paths():
    module = rehearsal()
    for recipe in module.RECIPES:
        for step in module.sequence(recipe):
            argv = step.argv()
            docs_form = shlex.split(step.docs.replace(step.gpu_launch, step.cpu_launch) if step.gpu_launch else step.docs)
            assert argv[: len(docs_form)] == docs_form, step.name
            extra = argv[len(docs_form):]
            for index, word in enumerate(extra):
                after_option = index > 0 and extra[index - 1] == "--predictions-out"
                assert "=" in word or word in EXTRA_OPTIONS or after_option, (step.name, word)
            if step.gpu_launch:
                assert "--gpus" not in step.cpu_launch or recipe == "4gpu" and step.name == "doctor", step.name
                assert "--cpu" in step.cpu_launch or step.name == "doctor", step.name

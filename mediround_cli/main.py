"""The ``mediround`` click group. A command's module is imported only when that command runs (or shows its
own help): listing the commands reads their one-line help from ``COMMANDS``, so ``mediround --help`` and
``--version`` import no command module (``train``'s pulls torch, transformers and peft: about 5 s)."""

from __future__ import annotations

import importlib
import importlib.util

import click

from mediround import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("mediround_cli.synth:synth", "Generate the synthetic multi-round benchmark (JSONL + PNGs)."),
    "validate": ("mediround_cli.validate:validate", "Check a dialogue file (JSONL or MR-MedSeg JSON) and its images."),
    "convert": ("mediround_cli.convert:convert", "Convert MR-MedSeg JSON <-> JSONL, or SA-Med2D folders to dialogues."),
    "build-dialogues": ("mediround_cli.build_dialogues:build_dialogues", "Build multi-round dialogues from labelled 2-D folders, nnU-Net volumes or DICOM."),
    "recipes": ("mediround_cli.recipes:recipes", "List the shipped training recipes, or print one to copy and edit."),
    "train": ("mediround_cli.train:train", "Train MediRound (teacher forcing) from a YAML recipe, multi-process."),
    "train-jcm": ("mediround_cli.train_jcm:train_jcm", "Train the JCM judge and refine MLPs on a frozen MediRound."),
    "infer": ("mediround_cli.infer:infer", "Predict masks round by round, chaining the model's own masks."),
    "chat": ("mediround_cli.chat:chat", "Ask questions about one image round by round; masks, overlays, latency."),
    "app": ("mediround_cli.app:app", "Serve a local web page for chat's round-by-round session (extra: app)."),
    "eval": ("mediround_cli.eval:eval_command", "Score predictions per round (Dice/gIoU/cIoU) and gate regressions."),
    "export": ("mediround_cli.export:export", "Export a checkpoint as a standalone folder with LoRA merged."),
    "convert-llava": ("mediround_cli.convert_llava:convert_llava", "Convert an original-layout LLaVA/LLaVA-Med checkpoint to HF."),
    "doctor": ("mediround_cli.doctor:doctor", "Pre-flight check of the stack, weights, data and GPU memory."),
    "demo": ("mediround_cli.demo:demo", "Run the shipped tiny model on a fresh synthetic set and write a report."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use; only existing modules are listed."""

    def _available(self) -> dict[str, tuple[str, str]]:
        found = {}
        for name, (target, help_text) in COMMANDS.items():
            module_name = target.split(":")[0]
            if importlib.util.find_spec(module_name) is not None:
                found[name] = (target, help_text)
        return found

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(self._available())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self._available().get(cmd_name)
        if entry is None:
            return None
        module_name, attr = entry[0].split(":")
        command = getattr(importlib.import_module(module_name), attr)
        command.short_help = entry[1]
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own listing asks each command for its short help, importing every command module.
        rows = [(name, help_text) for name, (_, help_text) in sorted(self._available().items())]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mediround")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """MediRound: multi-round, entity-level reasoning segmentation of medical images."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


if __name__ == "__main__":
    cli()

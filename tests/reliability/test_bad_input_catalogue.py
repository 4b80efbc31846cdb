"""A catalogue of broken (and odd but valid) inputs, each run through a real command in-process.

Every broken input must give exactly one line naming the file, the item and the field, the documented
exit code (0: done; 1: validate found problems; 2: a fatal input error; 3: a batch command (infer,
eval, convert) skipped and listed bad dialogues) and no traceback. In the batch commands (infer, eval --model) the
valid dialogues around a bad one are still predicted and the bad one is listed in ``DIR/errors.jsonl``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from reliability_fixtures import copy_checkpoint, one_round, record, write_lines

from mediround.data.formats import load_dialogues, write_mrmedseg
from mediround_cli.common import SKIPPED_EXIT_CODE
from mediround_cli.main import cli


@dataclass
class Run:
    """What a case runs and what it must print: ``needles`` all appear on exactly one output line."""

    argv: list[str]
    exit_code: int
    needles: tuple[str, ...] = ()
    errors: tuple[object, str | None] | None = None
    """For batch commands: the (item, field) of the one record expected in ``errors.jsonl``."""
    out: Path | None = None
    predicted: tuple[str, ...] = ()
    extra_checks: list[Callable[[str], None]] = field(default_factory=list)


@dataclass
class Env:
    tmp: Path
    data: Path
    checkpoint: Path

    def jsonl(self, *lines, name: str = "case.jsonl") -> Path:
        return write_lines(self.data / name, list(lines))

    def mrmedseg(self, edit: Callable[[list], None], name: str = "case.json") -> Path:
        """An MR-MedSeg file of two valid dialogues, after ``edit`` changed its items."""
        source = self.jsonl(record("m0"), record("m1"), name=f"{name}.source.jsonl")
        path = self.data / name
        write_mrmedseg(load_dialogues(source).dialogues, path)
        items = json.loads(path.read_text(encoding="utf-8"))
        edit(items)
        path.write_text(json.dumps(items), encoding="utf-8")
        return path

    def recipe(self, train: Path, **changes) -> Path:
        recipe = {
            "output": str(self.tmp / "train-out"),
            "model": {"preset": "tiny"},
            "data": {"train": str(train), "val": None},
            "train": {"batch_size": 1, "max_steps": 1, "threads": 1, "mixed_precision": "no", "warmup_steps": 0},
            "validation": {"every": 0, "at_start": False},
            "checkpoint": {"every": 0, "keep_last": 1},
            "log": {"every": 1},
        }
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            recipe[section][key] = value
        path = self.tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    def jcm_recipe(self, **jcm) -> Path:
        recipe = {
            "output": str(self.tmp / "jcm-out"),
            "data": {"train": str(self.jsonl(record("a"), record("b"), name="jcm.jsonl")), "val": None},
            "train": {"batch_size": 1, "max_steps": 1, "threads": 1, "mixed_precision": "no", "warmup_steps": 0},
            "jcm": jcm,
            "validation": {"every": 0, "at_start": False},
            "checkpoint": {"every": 0, "keep_last": 1},
        }
        path = self.tmp / "jcm.yaml"
        path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
        return path

    def validate(self, path: Path, exit_code: int, *needles: str) -> Run:
        return Run(["validate", str(path)], exit_code, (path.name, *needles))

    def infer(self, *lines, item: object, field_name: str | None) -> Run:
        """``lines`` between two valid dialogues, through ``infer``: both valid ones predicted, one error."""
        path = self.jsonl(one_round("good-a"), *lines, one_round("good-b"))
        out = self.tmp / "infer-out"
        argv = ["infer", str(path), "--model", str(self.checkpoint), "--out", str(out), "--cpu"]
        return Run(argv, SKIPPED_EXIT_CODE, ("1 dialogue(s) skipped",), (item, field_name), out, ("good-a", "good-b"))

    def broken_checkpoint(self, change: Callable[[Path], None]) -> Path:
        folder = copy_checkpoint(self.checkpoint, self.tmp / "checkpoint")
        change(folder)
        return folder


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _drop_mask_decode(items: list) -> None:
    gpt = items[1]["conversations"][3]
    gpt["value"] = gpt["value"].split("[MASK-DECODE")[0] + "it."


def _round(**changes) -> dict:
    return {**record("bad")["rounds"][0], **changes}


CASES: dict[str, Callable[[Env], Run]] = {
    # Data files (validate reports every problem, one line each, exit 1; a file it cannot read is exit 2).
    "jsonl truncated line": lambda e: e.validate(
        e.jsonl(record("a"), '{"id": "b", "image": "ima'), 1, "line 2", "invalid JSON"),
    "jsonl line not an object": lambda e: e.validate(
        e.jsonl(record("a"), "[1, 2]"), 1, "line 2", "must be a JSON object, got list"),
    "wrong type": lambda e: e.validate(
        e.jsonl(record("a"), record("b", image=5)), 1, "line 2: id b", "field 'image'", "must be a string"),
    "unknown field": lambda e: e.validate(
        e.jsonl(record("b", rounds=[_round(qeury="typo")])), 1, "line 1: id b", "field 'rounds[0].qeury'"),
    "ref points forward": lambda e: e.validate(
        e.jsonl(record("b", rounds=[_round(ref=1)])), 1, "line 1: id b", "field 'rounds[0].ref'", "earlier"),
    "ref out of range": lambda e: e.validate(
        e.jsonl(record("b", rounds=[_round(), _round(ref=7)])), 1, "id b", "field 'rounds[1].ref'", "allowed 1..1"),
    "ref to a round with an empty mask": lambda e: e.validate(
        e.jsonl(record("b", rounds=[_round(mask="masks/empty.png"), _round(ref=1)])), 1, "id b",
        "field 'rounds[0].mask'", "is empty but a later round refers"),
    "missing image": lambda e: e.validate(
        e.jsonl(record("b", image="images/nope.png")), 1, "id b", "field 'image'", "file not found"),
    "unreadable image (a folder)": lambda e: e.validate(
        e.jsonl(record("b", image="images")), 1, "id b", "field 'image'", "a folder"),
    "corrupt png": lambda e: e.validate(
        e.jsonl(record("b", image="images/corrupt.png")), 1, "id b", "field 'image'", "corrupt"),
    "zero-byte png": lambda e: e.validate(
        e.jsonl(record("b", image="images/empty.png")), 1, "id b", "field 'image'", "empty file (0 bytes)"),
    "mask of another size": lambda e: e.validate(
        e.jsonl(record("b", rounds=[_round(mask="masks/small.png")])), 1, "id b", "field 'rounds[0].mask'",
        "is 16x16 but the image is 32x32"),
    "10000x10000 image": lambda e: e.validate(
        e.jsonl(record("b", image="images/huge.png")), 1, "id b", "field 'image'", "too large: 10000x10000"),
    "non-UTF-8 bytes": lambda e: e.validate(
        e.jsonl(record("a"), b'{"id": "b", "image": "\xff\xfe"}'), 1, "line 2", "not UTF-8"),
    "path escaping the root": lambda e: e.validate(
        e.jsonl(record("b", image="../outside.png")), 1, "id b", "field 'image'", "leaves the root"),
    "absolute path": lambda e: e.validate(
        e.jsonl(record("b", image="/etc/hosts")), 1, "id b", "field 'image'", "absolute path"),
    "duplicate id": lambda e: e.validate(
        e.jsonl(record("a"), record("a")), 1, "line 2: id a", "field 'id'", "duplicate id"),
    "mrmedseg odd turn count": lambda e: e.validate(
        e.mrmedseg(lambda items: items[1]["conversations"].pop()), 1, "item 1", "field 'conversations'", "odd"),
    "mrmedseg ind out of range": lambda e: e.validate(
        e.mrmedseg(lambda items: items[0]["conversations"][2].update(ind=3)), 1, "item 0",
        "field 'conversations[2].ind'"),
    "mrmedseg truncated file": lambda e: Run(
        ["validate", str(write_lines(e.data / "cut.json", ['[{"conversations": [']))], 2,
        ("error:", "cut.json", "invalid JSON")),
    "missing data file": lambda e: Run(["validate", str(e.data / "nope.jsonl")], 2, ("error:", "nope.jsonl", "not found")),
    # Odd but valid images: they must work.
    "16-bit image works": lambda e: e.validate(e.jsonl(one_round("g", image="images/grey16.png")), 0),
    "palette image (and palette mask) works": lambda e: e.validate(
        e.jsonl(one_round("p", image="images/palette.png", mask="masks/palette.png")), 0),
    "1x1 image works": lambda e: e.validate(e.jsonl(one_round("o", image="images/one.png", mask="masks/one.png")), 0),
    # convert: bad dialogues skipped and listed (exit 3); one MR-MedSeg cannot hold is named.
    "convert skips a wrong type": lambda e: Run(
        ["convert", str(e.jsonl(record("a"), record("b", rounds="none"))), str(e.tmp / "out.jsonl")], SKIPPED_EXIT_CODE,
        ("case.jsonl", "line 2: id b", "field 'rounds'")),
    "convert to MR-MedSeg: ref to a round without mask": lambda e: Run(
        ["convert", str(e.jsonl(record("a"), record("b", rounds=[_round(mask=None), _round(ref=1)]))),
         str(e.tmp / "out.json")], SKIPPED_EXIT_CODE,
        ("case.jsonl", "line 2: id b", "field 'rounds[1].ref'", "only be written as JSONL")),
    # train / train-jcm: recipes and checkpoints are refused before any work; unlabelled dialogues skipped.
    "train recipe with a wrong type": lambda e: Run(
        ["train", str(e.recipe(e.jsonl(record("a")), train__lr="fast")), "--cpu"], 2, ("error:", "train.lr", "fast")),
    "train recipe with an unknown key": lambda e: Run(
        ["train", str(e.recipe(e.jsonl(record("a")), train__lrr=1e-3)), "--cpu"], 2, ("error:", "train.lrr")),
    "train skips a dialogue without MASK-DECODE": lambda e: Run(
        ["train", str(e.recipe(e.mrmedseg(_drop_mask_decode))), "--cpu"], 0,
        ("skipped:", "case.json", "item 1", "field 'conversations[3].value'", "no ground-truth mask")),
    "train-jcm recipe with a wrong type": lambda e: Run(
        ["train-jcm", str(e.jcm_recipe(beta="high")), "--model", str(e.checkpoint), "--cpu"], 2,
        ("error:", "jcm.beta", "high")),
    "train-jcm on an altered checkpoint": lambda e: Run(
        ["train-jcm", str(e.jcm_recipe()), "--cpu", "--model",
         str(e.broken_checkpoint(lambda f: _flip_a_byte(f / "heads.safetensors")))], 2,
        ("error:", "heads.safetensors", "sha256")),
    # infer: bad checkpoints are fatal (exit 2); bad dialogues are skipped, listed, the rest predicted.
    "infer: checkpoint with a missing file": lambda e: Run(
        ["infer", str(e.jsonl(one_round("a"))), "--out", str(e.tmp / "o"), "--cpu", "--model",
         str(e.broken_checkpoint(lambda f: (f / "base_sam.safetensors").unlink()))], 2,
        ("error:", "base_sam.safetensors", "missing")),
    "infer: checkpoint with an altered file": lambda e: Run(
        ["infer", str(e.jsonl(one_round("a"))), "--out", str(e.tmp / "o"), "--cpu", "--model",
         str(e.broken_checkpoint(lambda f: _flip_a_byte(f / "adapter" / "adapter_model.safetensors")))], 2,
        ("error:", "adapter_model.safetensors", "sha256")),
    "infer: two [SEG] in an answer": lambda e: e.infer(
        {**one_round("bad"), "rounds": [_round(answer="[SEG] and [SEG]")]}, item=2, field_name="rounds[0].answer"),
    "infer: missing image": lambda e: e.infer(one_round("bad", image="images/nope.png"), item=2, field_name="image"),
    "infer: corrupt png": lambda e: e.infer(one_round("bad", image="images/corrupt.png"), item=2, field_name="image"),
    "infer: 10000x10000 image": lambda e: e.infer(one_round("bad", image="images/huge.png"), item=2,
                                                  field_name="image"),
    "infer: line not an object": lambda e: e.infer("[1, 2]", item="line 2", field_name=None),
    # eval: scoring a predictions folder with a broken line; eval --model skips like infer.
    "eval --model: zero-byte image skipped": lambda e: _eval_model(e),
    # demo: its checkpoint is checked like any other.
    "demo on a checkpoint with an altered file": lambda e: Run(
        ["demo", "--out", str(e.tmp / "demo"), "--dialogues", "1", "--model",
         str(e.broken_checkpoint(lambda f: _flip_a_byte(f / "config.json")))], 2, ("error:", "config.json")),
}


def _eval_model(env: Env) -> Run:
    path = env.jsonl(one_round("good-a"), one_round("bad", image="images/empty.png"), one_round("good-b"))
    out = env.tmp / "eval-out"
    argv = ["eval", str(path), "--model", str(env.checkpoint), "--predictions-out", str(out), "--cpu",
            "--out", str(env.tmp / "metrics.parquet")]
    return Run(argv, SKIPPED_EXIT_CODE, ("1 dialogue(s) skipped",), (2, "image"), out, ("good-a", "good-b"))


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_gives_one_line_naming_file_item_and_field(case, tmp_path, dataset, tiny_checkpoint):
    env = Env(tmp_path, dataset, tiny_checkpoint)
    run = CASES[case](env)
    result = CliRunner().invoke(cli, run.argv)
    output = result.output
    assert "Traceback" not in output and not isinstance(result.exception, AssertionError), output
    assert result.exit_code == run.exit_code, output
    if run.needles:
        matching = [line for line in output.splitlines() if all(needle in line for needle in run.needles)]
        assert len(matching) == 1, f"expected one line with {run.needles}:\n{output}"
    if run.exit_code == 2:
        assert len([line for line in output.splitlines() if line.startswith("error:")]) == 1, output
    if run.errors is not None:
        records = [json.loads(line) for line in (run.out / "errors.jsonl").read_text().splitlines()]
        assert [(r["item"], r["field"]) for r in records] == [run.errors], records
        predicted = {json.loads(line)["id"] for line in (run.out / "predictions.jsonl").read_text().splitlines()}
        assert predicted == set(run.predicted)


def test_catalogue_is_large_enough():
    broken = [name for name in CASES if not name.endswith("works")]
    assert len(broken) >= 25


def test_a_100_kb_query_is_truncated_with_a_warning_and_predicted(tmp_path, dataset, tiny_checkpoint):
    long = {**one_round("long"), "rounds": [_round(query="liver " * 17_000)]}
    data = write_lines(dataset / "long.jsonl", [one_round("short"), long])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["infer", str(data), "--model", str(tiny_checkpoint), "--out", str(out), "--cpu"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "truncated to its first 512" in warnings[0], result.output
    assert {json.loads(line)["id"] for line in (out / "predictions.jsonl").read_text().splitlines()} == {
        "short", "long"}


def test_debug_shows_the_traceback(dataset):
    result = CliRunner().invoke(cli, ["--debug", "validate", str(dataset / "nope.jsonl")])
    assert result.exit_code != 0 and result.exception is not None
    assert type(result.exception).__name__ == "DataError"

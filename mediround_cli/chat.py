"""``mediround chat IMAGE``: questions about one image, one at a time, each over the cached earlier rounds."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from click.core import ParameterSource
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mediround.data.dialogue import Round
from mediround.data.scans import ScanOptions, check_questions, is_scan, read_scan, volumes_extra_ready
from mediround.default_model import default_checkpoint
from mediround.inference import DEFAULT_BATCH_SIZE, DEFAULT_BETA
from mediround_cli.common import SKIPPED_EXIT_CODE, console, err_console, handle_errors
from mediround_cli.output import jcm_rounds_option, load_chat_model, progress_bar
from mediround_cli.volume_options import slices_option, window_option

COMMANDS_HELP = """\b
Each line is a question, or a command:
  QUESTION        ask; prints the answer, the mask's area and box, the JCM score
                  (and whether the refined [SEG] was used) and the round's latency
  @N QUESTION     the question refers to round N's mask, e.g.
                  "@1 Segment the organ below it." (@N may stand anywhere);
                  with --jcm-rounds referred, round N is judged now (and its mask
                  refined when JCM says so) before it becomes the reference
  :undo           forget the last round (a round only it got judged is raw again)
  :reset          start over on the same image
  :quit           end (as does the end of input or Ctrl-D)

\b
A VOLUME (a NIfTI file .nii/.nii.gz, or the folder of one DICOM series) runs
the -q questions as one dialogue on every selected axial slice, slices in
batches; it writes a label volume on the input's grid (NIfTI) or a DICOM-SEG
object (DICOM), and a JSON sidecar (docs/formats.md, "Volumes in, volumes out").

\b
Examples:
  mediround chat ct-slice.png -q "Segment the liver." -q "@1 Segment the lesion inside it." --save chat.jsonl
  mediround chat ct.nii.gz -q "Segment the liver." -q "@1 Segment the lesion inside it." --slices 40:80 --per-round
  mediround chat dicom/series-3/ -q "Segment the liver." --case-id patient-17 --out liver
"""
VOLUME_ONLY = ("slices", "window", "per_round", "batch_size", "case_id")


def _lines(queries: tuple[str, ...], prompt: Callable[[], str]) -> Iterator[str]:
    """The -q questions, else the lines of stdin (after ``prompt()`` when it is a terminal)."""
    if queries:
        yield from queries
        return
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield console.input(prompt())
        except (EOFError, KeyboardInterrupt):
            return


def _say(target: Console, text: str) -> None:
    """Print ``text`` wrapped at word boundaries in a terminal; piped, as whole lines (for logs and grep)."""
    target.print(text, soft_wrap=not target.is_terminal)


def _verdict(round_, beta: float) -> str:
    """What JCM said about a judged round, e.g. "JCM 0.41 <= 0.6: refined"."""
    return f"JCM {round_.jcm_score:.2f} {'<=' if round_.refined else '>'} {beta:g}: " + \
        ("refined" if round_.refined else "raw")


def _judged_now(round_, beta: float, out: Path) -> str:
    """The line for an earlier round that a referring question got judged (``--jcm-rounds referred``)."""
    change = (f"; mask updated, {round_.area:,} px ({escape(str(out / f'round-{round_.number}.png'))} rewritten)"
              if round_.refined else ", mask kept")
    return f"round {round_.number} judged now: {_verdict(round_, beta)}{change}"


def _describe(round_, beta: float | None, shape: tuple[int, int]) -> str:
    ref = f" (refers to round {round_.ref})" if round_.ref is not None else ""
    share = 100 * round_.area / (shape[0] * shape[1])
    if round_.box is None:
        box = "no box (empty mask)"
    else:
        x_min, y_min, x_max, y_max = round_.box
        box = f"box x {x_min}-{x_max}, y {y_min}-{y_max}"
    if beta is None:
        jcm = "JCM off"
    elif round_.jcm_score is None:
        jcm = "JCM: not referred yet"
    else:
        jcm = _verdict(round_, beta)
    seg = "" if round_.seg_found else "; [SEG] fed (the answer had none)"
    return (f"[bold]round {round_.number}[/bold]{ref}: {escape(round_.answer)}\n"
            f"  mask {round_.area:,} px ({share:.1f}%), {box}; {jcm}; {1000 * round_.seconds:.0f} ms{seg}")


def _undone(chat) -> str:
    """Undo the last round; the line also names the rounds it had got judged, which are unjudged again."""
    unjudged = [(r.number, r.refined) for r in chat.judged_by(len(chat.rounds))]
    line = f"round {chat.undo().number} undone"
    for number, refined in unjudged:
        line += f"; round {number} is unjudged again (no remaining round refers to it)" + \
            (", its raw mask restored" if refined else "")
    return line


def _summary(chat, out: Path, save: Path | None, refused: int) -> Table:
    table = Table(title=f"mediround chat: {chat.image_path.name}")
    for column in ("round", "ref", "question", "answer", "area px", "JCM", "ms"):
        table.add_column(column, justify="right" if column in ("round", "ref", "area px", "ms") else "left")
    for r in chat.rounds:
        if chat.beta is None:
            jcm = "off"
        else:
            jcm = "not judged" if r.jcm_score is None else f"{r.jcm_score:.2f}{' refined' if r.refined else ''}"
        table.add_row(str(r.number), "" if r.ref is None else str(r.ref), r.query, r.answer, f"{r.area:,}", jcm,
                      f"{1000 * r.seconds:.0f}")
    table.caption = (f"image encoded once in {1000 * chat.encode_seconds:.0f} ms; masks and overlays in {out}"
                     + (f"; dialogue saved to {save}" if save is not None else "")
                     + (f"; {refused} line(s) refused" if refused else ""))
    return table


def _volume_questions(lines: Iterator[str]) -> list[Round]:
    """The questions of a volume dialogue, all given up front (``@N`` references; no :commands)."""
    from mediround.inference.chat import QuestionError, parse_question

    questions = []
    for number, line in enumerate((line.strip() for line in lines if line.strip()), start=1):
        if line.startswith(":"):
            raise click.UsageError(f"question {number}: {line!r}: a volume's dialogue has no :commands")
        try:
            question = parse_question(line)
        except QuestionError as error:
            raise click.UsageError(f"question {number}: {error}") from None
        questions.append(Round(query=question.query, ref=question.ref))
    return questions


def _slices_cell(slices: list[int]) -> str:
    if not slices:
        return "0"
    runs = f"{slices[0]}-{slices[-1]}" if slices[-1] - slices[0] + 1 == len(slices) else f"{slices[0]}..{slices[-1]}"
    return f"{len(slices)} ({runs})"


def _volume_summary(result, asked_window: str, seconds: float, out: Path, jcm: str) -> Table:
    scan = result.scan
    table = Table(title=f"mediround chat: {scan.case} ({scan.kind}, {'x'.join(map(str, scan.native_shape))} voxels)")
    columns = ["label", "ref", "question", "voxels", "ml", "slices with a mask"]
    if scan.kind == "nifti":
        columns.append("in label volume")
    for column in columns:
        table.add_column(column, justify="left" if column == "question" else "right")
    for r in result.rounds:
        row = [str(r.round), "" if r.refers_to is None else str(r.refers_to), escape(r.question), f"{r.voxels:,}",
               f"{r.ml:.2f}", _slices_cell(r.slices_with_mask)]
        if r.voxels_in_label_volume is not None:
            row.append(f"{r.voxels_in_label_volume:,}")
        table.add_row(*row)
    window = result.window if result.window == asked_window else f"{result.window} ({asked_window}: modality " \
        f"{scan.modality or 'unknown'})"
    files = ", ".join(str(out / name) for kind, name in result.files.items() if kind != "rounds")
    if "rounds" in result.files:
        files += f", {len(result.files['rounds'])} per-round files"
    table.caption = escape(f"{len(result.slices)} axial slice(s) in {seconds:.1f} s; window {window}; {jcm}. Wrote {files}")
    return table


@click.command(epilog=COMMANDS_HELP)
@click.argument("image", type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder (from `mediround train` / `train-jcm`) [default: the shipped tiny model].")
@click.option("--beta", default=None, metavar="BETA|off",
              help="JCM threshold: q > BETA decodes the raw [SEG], otherwise the refined one; 'off' disables "
                   f"JCM. [default: {DEFAULT_BETA:g} when the checkpoint has trained JCM weights, else off]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for round-N.png (mask) and round-N-overlay.png; round files of an earlier chat "
                   "there are replaced [default: ./chat-<image name>].")
@jcm_rounds_option
@click.option("-q", "--query", "queries", multiple=True,
              help="A line to run instead of reading the terminal (repeat for several rounds).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the session as a one-dialogue JSONL file (questions, the model's answers, @N "
                   "references) that `mediround infer` reads; rewritten after every round (2-D images).")
@slices_option("Volumes: the axial slices to run: every slice, A:B (slices A to B-1, 0-based), or largest "
               "(run every slice, keep each round's mask on its largest slice only).")
@window_option
@click.option("--per-round", is_flag=True, help="NIfTI volumes: also write each round's whole mask as a 0/1 NIfTI.")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Volumes: slices that advance together, round by round, sharing each forward pass.")
@click.option("--case-id", help="Volumes: the name of the output files [default: the NIfTI file's name; DICOM: "
                                "series- and a hash of the SeriesInstanceUID, never a header value].")
@handle_errors
def chat(image: Path, model_path: Path | None, beta: str | None, out: Path | None, jcm_rounds: str | None,
         queries: tuple[str, ...], save: Path | None, slices: tuple, window: str, per_round: bool, batch_size: int,
         case_id: str | None) -> None:
    """Ask questions about IMAGE one at a time; each round segments what it asks for.

    The image is encoded once and earlier rounds stay in the model's cache, so a new question costs only
    its own tokens. The model writes every answer. Exits 3 when a line was refused (a bad @N reference,
    an unknown :command), after running the others. IMAGE may be a VOLUME (see below).
    """
    if is_scan(image):
        if save is not None:
            raise click.UsageError("--save keeps a 2-D chat; a volume's dialogue is the -q questions")
        _chat_volume(image, model_path, beta, out, jcm_rounds, queries, slices, window, per_round, batch_size, case_id)
        return
    context = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in VOLUME_ONLY
             if context.get_parameter_source(name) is not ParameterSource.DEFAULT]
    if given:
        raise click.UsageError(f"{', '.join(given)}: for volumes only (a NIfTI file or a DICOM series folder)")
    # The model pulls in torch: imported here so that `mediround chat --help` stays fast.
    from mediround.inference.chat import ChatSession, QuestionError, parse_question

    model, threshold = load_chat_model(model_path, beta)
    out = out or Path(f"chat-{image.stem}")
    session = ChatSession(model, image, threshold, out, jcm_rounds)
    jcm = _jcm_words(threshold, session.jcm_rounds)
    _say(err_console, f"{image.name}: encoded in {1000 * session.encode_seconds:.0f} ms; {jcm}; ask a question "
         "(:quit to end)")
    refused = 0
    for line in _lines(queries, lambda: f"[bold]round {len(session.rounds) + 1}>[/bold] "):
        line = line.strip()
        if not line:
            continue
        try:
            if line == ":quit":
                break
            if line == ":undo":
                _say(console, _undone(session))
            elif line == ":reset":
                session.reset()
                console.print("session reset")
            elif line.startswith(":"):
                raise QuestionError(f"{line!r}: unknown command (:undo, :reset, :quit)")
            else:
                question = parse_question(line)
                with err_console.status("thinking"):
                    answered = session.ask(question.query, question.ref)
                for judged in session.judged_by(answered.number):
                    _say(console, _judged_now(judged, threshold, out))
                _say(console, _describe(answered, threshold, session.image.shape[:2]))
        except QuestionError as error:
            refused += 1
            _say(err_console, f"[red]error:[/red] {escape(str(error))}")
            continue
        if save is not None and session.rounds:
            session.save(save)
    if session.rounds:
        console.print(_summary(session, out, save, refused))
    else:
        _say(console, "no rounds to summarise" + (f"; {refused} line(s) refused" if refused else ""))
    if save is not None and session.rounds and Path(session.dialogue(save.parent).image).parts[:1] == ("..",):
        _say(err_console, f"the image lies outside {save.parent}: read it back with `mediround infer {save} "
             "--allow-outside-root`")
    if refused:
        sys.exit(SKIPPED_EXIT_CODE)


def _jcm_words(threshold: float | None, jcm_rounds: str) -> str:
    if threshold is None:
        return "JCM off"
    if jcm_rounds == "referred":
        return f"JCM at beta {threshold:g} on referred rounds (judged when a question refers to them)"
    return f"JCM at beta {threshold:g} on every round"


def _chat_volume(path: Path, model_path: Path | None, beta: str | None, out: Path | None, jcm_rounds: str | None,
                 queries: tuple[str, ...], slices: tuple, window: str, per_round: bool, batch_size: int,
                 case_id: str | None) -> None:
    """``chat VOLUME``: the questions on every selected slice (``mediround.inference.volumes``)."""
    from mediround.inference.volumes import chat_volume

    volumes_extra_ready(path)
    if not queries and sys.stdin.isatty():
        raise click.UsageError("a volume's questions come all at once: give them with -q (or pipe them in, one a line)")
    questions = _volume_questions(_lines(queries, str))
    check_questions(questions)
    scan = read_scan(path, case_id)
    if per_round and scan.kind == "dicom":
        raise click.UsageError("--per-round is for NIfTI volumes: the DICOM-SEG holds each round's whole mask as its segment")
    model, threshold = load_chat_model(model_path, beta)
    rounds = jcm_rounds or model.config.heads.jcm_rounds
    out = out or Path(f"chat-{scan.case}")
    settings = {"beta": threshold, "jcm_rounds": rounds, "batch_size": batch_size,
                "checkpoint": str(model_path or default_checkpoint())}
    options = ScanOptions(slices=slices, window=window, per_round=per_round, model=settings)
    started = time.perf_counter()
    with progress_bar("slices") as progress:
        task = progress.add_task("slices", total=None)
        result = chat_volume(model, scan, questions, out, options, beta=threshold, jcm_rounds=rounds,
                             batch_size=batch_size,
                             progress=lambda done, total: progress.update(task, completed=done, total=total))
    console.print(_volume_summary(result, window, time.perf_counter() - started, out, _jcm_words(threshold, rounds)))

"""``mediround chat IMAGE``: questions about one image, one at a time, each over the cached earlier rounds."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from mediround.default_model import default_checkpoint, default_model_notice
from mediround.inference import DEFAULT_BETA
from mediround_cli.common import SKIPPED_EXIT_CODE, console, err_console, handle_errors
from mediround_cli.output import parse_beta

COMMANDS_HELP = """\b
Each line is a question, or a command:
  QUESTION        ask; prints the answer, the mask's area and box, the JCM score
                  (and whether the refined [SEG] was used) and the round's latency
  @N QUESTION     the question refers to round N's mask, e.g.
                  "@1 Segment the organ below it." (@N may stand anywhere)
  :undo           forget the last round
  :reset          start over on the same image
  :quit           end (as does the end of input or Ctrl-D)

\b
Examples:
  mediround chat ct-slice.png
  mediround chat ct-slice.png -q "Segment the liver." -q "@1 Segment the lesion inside it." --save chat.jsonl
  mediround chat ct-slice.png --model runs/jcm-7b-4gpu/model --beta 0.6 --out chat-ct
"""


def _lines(queries: tuple[str, ...]) -> Iterator[str]:
    """The -q questions, else the lines of stdin (with a prompt when it is a terminal)."""
    if queries:
        yield from queries
        return
    if not sys.stdin.isatty():
        yield from sys.stdin
        return
    while True:
        try:
            yield console.input("[bold]> [/bold]")
        except (EOFError, KeyboardInterrupt):
            return


def _describe(round_, beta: float | None, shape: tuple[int, int]) -> str:
    ref = f" (refers to round {round_.ref})" if round_.ref is not None else ""
    share = 100 * round_.area / (shape[0] * shape[1])
    box = "no box (empty mask)" if round_.box is None else "box x {}-{}, y {}-{}".format(
        round_.box[0], round_.box[2], round_.box[1], round_.box[3])
    if round_.jcm_score is None:
        jcm = "JCM off"
    else:
        jcm = f"JCM {round_.jcm_score:.2f} {'<=' if round_.refined else '>'} {beta:g}: " + \
            ("refined" if round_.refined else "raw")
    seg = "" if round_.seg_found else "; [SEG] fed (the answer had none)"
    return (f"[bold]round {round_.number}[/bold]{ref}: {escape(round_.answer)}\n"
            f"  mask {round_.area:,} px ({share:.1f}%), {box}; {jcm}; {1000 * round_.seconds:.0f} ms{seg}")


def _summary(chat, out: Path, save: Path | None, refused: int) -> Table:
    table = Table(title=f"mediround chat: {chat.image_path.name}")
    for column in ("round", "ref", "question", "answer", "area px", "JCM", "ms"):
        table.add_column(column, justify="right" if column in ("round", "ref", "area px", "ms") else "left")
    for r in chat.rounds:
        jcm = "off" if r.jcm_score is None else f"{r.jcm_score:.2f}{' refined' if r.refined else ''}"
        table.add_row(str(r.number), "" if r.ref is None else str(r.ref), r.query, r.answer, f"{r.area:,}", jcm,
                      f"{1000 * r.seconds:.0f}")
    table.caption = (f"image encoded once in {1000 * chat.encode_seconds:.0f} ms; masks and overlays in {out}"
                     + (f"; dialogue saved to {save}" if save is not None and chat.rounds else "")
                     + (f"; {refused} line(s) refused" if refused else ""))
    return table


@click.command(epilog=COMMANDS_HELP)
@click.argument("image", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_path", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Checkpoint folder (from `mediround train` / `train-jcm`) [default: the shipped tiny model].")
@click.option("--beta", default=None, metavar="BETA|off",
              help="JCM threshold: q > BETA decodes the raw [SEG], otherwise the refined one; 'off' disables "
                   f"JCM. [default: {DEFAULT_BETA:g} when the checkpoint has trained JCM weights, else off]")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder for round-N.png (mask) and round-N-overlay.png; round files of an earlier chat "
                   "there are replaced [default: ./chat-<image name>].")
@click.option("-q", "--query", "queries", multiple=True,
              help="A line to run instead of reading the terminal (repeat for several rounds).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the session as a one-dialogue JSONL file (questions, the model's answers, @N "
                   "references) that `mediround infer` reads; rewritten after every round.")
@handle_errors
def chat(image: Path, model_path: Path | None, beta: str | None, out: Path | None, queries: tuple[str, ...],
         save: Path | None) -> None:
    """Ask questions about IMAGE one at a time; each round segments what it asks for.

    The image is encoded once and earlier rounds stay in the model's cache, so a new question costs only
    its own tokens. The model writes every answer. Exits 3 when a line was refused (a bad @N reference,
    an unknown :command), after running the others.
    """
    # The model pulls in torch: imported here so that `mediround chat --help` stays fast.
    from mediround.inference.chat import ChatSession, QuestionError, parse_question
    from mediround.inference.runner import checked_betas, model_folder
    from mediround.model.checkpoint import load_checkpoint

    if model_path is None:
        model_path = default_checkpoint()
        err_console.print(default_model_notice(model_path), soft_wrap=True)
    model = load_checkpoint(model_folder(model_path)).eval()
    [threshold] = checked_betas(() if beta is None else (parse_beta(beta),), model.config, str(model_path))
    out = out or Path(f"chat-{image.stem}")
    session = ChatSession(model, image, threshold, out)
    err_console.print(f"{image.name}: encoded in {1000 * session.encode_seconds:.0f} ms; "
                      + ("JCM off" if threshold is None else f"JCM at beta {threshold:g}")
                      + "; ask a question (:quit to end)", soft_wrap=True)
    refused = 0
    for line in _lines(queries):
        line = line.strip()
        if not line:
            continue
        try:
            if line == ":quit":
                break
            if line == ":undo":
                console.print(f"round {session.undo().number} undone")
            elif line == ":reset":
                session.reset()
                console.print("session reset")
            elif line.startswith(":"):
                raise QuestionError(f"{line!r}: unknown command (:undo, :reset, :quit)")
            else:
                question = parse_question(line)
                with err_console.status("thinking"):
                    answered = session.ask(question.query, question.ref)
                console.print(_describe(answered, threshold, session.image.shape[:2]), soft_wrap=True)
        except QuestionError as error:
            refused += 1
            err_console.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)
            continue
        if save is not None and session.rounds:
            session.save(save)
    console.print(_summary(session, out, save, refused))
    if save is not None and session.rounds and Path(session.dialogue(save.parent).image).parts[:1] == ("..",):
        err_console.print(f"the image lies outside {save.parent}: read it back with `mediround infer {save} "
                          "--allow-outside-root`", soft_wrap=True)
    if refused:
        sys.exit(SKIPPED_EXIT_CODE)

"""``mediround chat IMAGE``: questions about one image, one at a time, each over the cached earlier rounds."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mediround.default_model import default_checkpoint, default_model_notice
from mediround.inference import DEFAULT_BETA
from mediround_cli.common import SKIPPED_EXIT_CODE, console, err_console, handle_errors
from mediround_cli.output import jcm_rounds_option, parse_beta

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
Examples:
  mediround chat ct-slice.png
  mediround chat ct-slice.png -q "Segment the liver." -q "@1 Segment the lesion inside it." --save chat.jsonl
  mediround chat ct-slice.png --model runs/jcm-7b-4gpu/model --beta 0.6 --out chat-ct
"""


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
@jcm_rounds_option
@click.option("-q", "--query", "queries", multiple=True,
              help="A line to run instead of reading the terminal (repeat for several rounds).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path),
              help="Keep the session as a one-dialogue JSONL file (questions, the model's answers, @N "
                   "references) that `mediround infer` reads; rewritten after every round.")
@handle_errors
def chat(image: Path, model_path: Path | None, beta: str | None, out: Path | None, jcm_rounds: str | None,
         queries: tuple[str, ...], save: Path | None) -> None:
    """Ask questions about IMAGE one at a time; each round segments what it asks for.

    The image is encoded once and earlier rounds stay in the model's cache, so a new question costs only
    its own tokens. The model writes every answer. Exits 3 when a line was refused (a bad @N reference,
    an unknown :command), after running the others.
    """
    # The model pulls in torch: imported here so that `mediround chat --help` stays fast.
    from mediround.inference.chat import ChatSession, QuestionError, parse_question
    from mediround.inference.checkpoint_policy import checked_betas, model_folder
    from mediround.model.checkpoint import load_checkpoint

    if model_path is None:
        model_path = default_checkpoint()
        _say(err_console, default_model_notice(model_path))
    model = load_checkpoint(model_folder(model_path)).eval()
    [threshold] = checked_betas(() if beta is None else (parse_beta(beta),), model.config, str(model_path))
    out = out or Path(f"chat-{image.stem}")
    session = ChatSession(model, image, threshold, out, jcm_rounds)
    if threshold is None:
        jcm = "JCM off"
    elif session.jcm_rounds == "referred":
        jcm = f"JCM at beta {threshold:g} on referred rounds (judged when a question refers to them)"
    else:
        jcm = f"JCM at beta {threshold:g} on every round"
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

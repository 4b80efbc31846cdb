"""``mediround app`` without a browser (issue #32): the page's handlers (``mediround.app.session``) drive
the ``ChatSession`` that ``mediround chat`` drives, so the same questions give the same masks; a volume's
slice is the one ``chat VOLUME`` segments; bad input is one line and the session goes on; the command
says how to install gradio when it is missing, and warns when it listens beyond this machine."""

from __future__ import annotations

import json
import sys

import nibabel
import numpy as np
import pytest
from click.testing import CliRunner
from volume_files import write_dicom_series

from mediround.app import server
from mediround.app.session import AppSession, error_line
from mediround.data.images import load_image, load_mask
from mediround.data.scans import read_scan, scan_window, slice_image
from mediround.default_model import default_checkpoint
from mediround.errors import MediRoundError
from mediround.inference.chat import ChatSession, parse_question
from mediround.model.checkpoint import load_checkpoint
from mediround.model.mediround import MediRound
from mediround_cli.main import cli

SLICE = ("sam-med2d-demo", "data_demo", "images", "amos_0006_90.png")
LINES = ["Segment the liver.", "Segment the organ beside it.", "@1 Segment the left kidney.", "Segment the spleen."]
BETA = 0.95
"""High enough that the shipped model's JCM refines rounds of this slice (its scores are about 0.9)."""


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(default_checkpoint()).eval()


def test_the_page_and_chat_give_the_same_rounds_on_a_real_slice(shipped, shared_data, tmp_path, monkeypatch):
    image = shared_data(*SLICE)
    encodes: list[int] = []
    sam_embed = MediRound.sam_embed
    monkeypatch.setattr(MediRound, "sam_embed", lambda self, *a: (encodes.append(1), sam_embed(self, *a))[1])
    app = AppSession(shipped, tmp_path / "tab", BETA, "referred")
    app.open_files([image])
    app.ask(LINES[0])
    assert app.select(1) == 1  # a click on round 1 in the history strip: the next question refers to it
    app.ask(LINES[1])
    app.ask(LINES[2])
    assert app.select(2) == 2 and app.select(2) is None  # a second click clears the reference
    app.ask(LINES[3])
    assert isinstance(app.chat, ChatSession) and encodes == [1]

    chat = ChatSession(shipped, image, BETA, tmp_path / "chat", "referred")
    for line in ["Segment the liver.", "@1 Segment the organ beside it.", *LINES[2:]]:
        question = parse_question(line)
        chat.ask(question.query, question.ref)
    assert [r.ref for r in app.rounds] == [None, 1, 1, None]
    assert any(r.refined for r in app.rounds)  # the judged path ran, not only raw masks
    for page_round, chat_round in zip(app.rounds, chat.rounds, strict=True):
        assert (page_round.answer, page_round.jcm_score, page_round.refined) == (
            chat_round.answer, chat_round.jcm_score, chat_round.refined)
        assert np.array_equal(page_round.mask, chat_round.mask)

    # The session folder is what the download holds: chat's files, and a dialogue `infer` reads.
    session = tmp_path / "tab" / "session"
    for number, chat_round in enumerate(chat.rounds, start=1):
        assert np.array_equal(load_mask(session / "rounds" / f"round-{number}.png"), chat_round.mask)
    record = json.loads((session / "session.jsonl").read_text())
    assert record["image"] == "amos_0006_90.png"
    assert [(r["query"], r["answer"], r.get("ref")) for r in record["rounds"]] == [
        (r.query, r.answer, r.ref) for r in chat.dialogue().rounds]
    settings = json.loads((session / "session.json").read_text())
    assert settings["replay"] == f"mediround infer session.jsonl --generate --beta {BETA:g} --jcm-rounds referred"
    assert np.array_equal(load_image(session / "amos_0006_90.png"), load_image(image))
    views = app.views()
    assert [v.caption for v in views][:2] == ["R1: Segment the liver.", "R2 (ref 1): Segment the organ beside it."]
    assert views[0].overlay.shape == load_image(image).shape and "JCM" in views[0].jcm


def test_bad_input_is_one_line_and_the_session_goes_on(shipped, shared_data, tmp_path):
    app = AppSession(shipped, tmp_path / "tab", None)
    with pytest.raises(MediRoundError, match="upload an image first"):
        app.ask("Segment the liver.")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    series = tmp_path / "series.nii.gz"
    nibabel.save(nibabel.Nifti1Image(np.zeros((8, 8, 4, 3), np.int16), np.eye(4)), series)
    app.open_files([shared_data(*SLICE)])
    app.ask("Segment the liver.")
    bad = {
        "corrupt.png: not a readable image": lambda: app.open_files([corrupt]),
        "notes.txt: not a PNG/JPEG image": lambda: app.open_files([text]),
        "series.nii.gz: 4-D volume of 3 volumes": lambda: app.open_files([series]),
        "empty question": lambda: app.ask("   "),
        "@4: there is no round 4": lambda: app.ask("@4 Segment it."),
        "no round 3 to refer to": lambda: app.select(3),
        "beta 1.5 is outside [0, 1]": lambda: app.set_beta(1.5),
        "jcm-rounds 'some'": lambda: app.set_jcm_rounds("some"),
        "no volume uploaded": lambda: app.select_slice(2),
    }
    for expected, action in bad.items():
        with pytest.raises(MediRoundError) as raised:
            action()
        line = error_line(raised.value)
        assert expected in line and "\n" not in line and str(tmp_path) not in line, line
        assert len(app.rounds) == 1 and app.image_path.name == "amos_0006_90.png"  # nothing changed
    assert app.ask("Segment the spleen.").number == 2


def test_undo_reset_and_jcm_changes_apply_to_the_next_rounds(shipped, shared_data, tmp_path):
    app = AppSession(shipped, tmp_path / "tab", BETA, "all")
    app.open_files([shared_data(*SLICE)])
    session = tmp_path / "tab" / "session"
    first = app.ask("Segment the liver.")
    assert first.jcm_score is not None  # judged when asked: 'all'
    app.set_beta(None)
    second = app.ask("Segment the spleen.")
    assert second.jcm_score is None and app.views()[1].jcm == "JCM off"
    settings = json.loads((session / "session.json").read_text())
    assert [(r["beta"], r["jcm_rounds"]) for r in settings["rounds"]] == [(BETA, "all"), (None, "all")]
    assert settings["replay"] is None and "different JCM settings" in settings["note"]
    assert app.undo().number == 2
    assert json.loads((session / "session.json").read_text())["replay"] is not None
    assert len(json.loads((session / "session.jsonl").read_text())["rounds"]) == 1
    assert not (session / "rounds" / "round-2.png").exists()
    archive = app.archive()
    assert archive.name == "mediround-session-amos_0006_90.zip"
    app.reset()
    assert app.rounds == [] and not (session / "session.jsonl").exists()
    with pytest.raises(MediRoundError, match="no rounds to download"):
        app.archive()
    app.close()
    assert not (tmp_path / "tab").exists()


def test_a_volume_slice_is_the_one_chat_volume_segments(shipped, tmp_path):
    data = np.zeros((24, 20, 6), np.int16)
    data[4:12, 5:15, :] = 300
    data[14:20, 2:8, 2:4] = -500
    path = tmp_path / "ct scan.nii.gz"
    nibabel.save(nibabel.Nifti1Image(data, np.diag([1.5, 1.5, 3.0, 1.0])), path)
    app = AppSession(shipped, tmp_path / "tab", None)
    app.open_files([path])
    scan = read_scan(path)
    assert app.volume.count == 6 and app.volume.index == 3
    _, bounds = scan_window(scan, "auto")
    assert np.array_equal(app.image, slice_image(scan, 3, bounds))
    app.ask("Segment the bright structure.")
    app.select_slice(2)
    assert app.rounds == [] and app.image_path.name == "ct_scan-axial-002.png"  # a new image starts over
    app.set_window("-600,1500")
    assert np.array_equal(app.image, slice_image(scan, 2, scan_window(scan, "-600,1500")[1]))
    assert not np.array_equal(app.image, slice_image(scan, 2, bounds))
    for action, expected in ((lambda: app.set_window("soft"), "--window: expected"),
                             (lambda: app.select_slice(6), "slice 6: the volume has slices 0..5")):
        with pytest.raises(MediRoundError, match=expected):
            action()
    assert app.ask("Segment it.").number == 1
    assert json.loads((tmp_path / "tab" / "session" / "session.json").read_text())["source"] == {
        "file": "ct scan.nii.gz", "image": "ct_scan-axial-002.png", "case": "ct_scan", "axial_slice": 2,
        "window": "-600,1500"}


def test_a_dicom_series_upload_is_the_series_chat_volume_reads(shipped, tmp_path):
    # The browser hands the page a series as its files, in any order and in a temporary folder of its own.
    planes = [np.full((16, 12), 1000 + 40 * z, np.int16) for z in range(5)]
    for z, plane in enumerate(planes):
        plane[4:10, 3:9] = 1400 + 60 * z
    files = write_dicom_series(tmp_path / "upload", planes, intercept=-1024.0)
    app = AppSession(shipped, tmp_path / "tab", None)
    app.open_files(list(reversed(files)))
    scan = read_scan(tmp_path / "upload")
    assert app.volume.count == 5 and app.volume.index == 2
    assert np.array_equal(app.image, slice_image(scan, 2, scan_window(scan, "auto")[1]))
    assert app.ask("Segment the bright structure.").number == 1
    app.select_slice(4)
    assert np.array_equal(app.image, slice_image(scan, 4, scan_window(scan, "auto")[1]))
    app.close()


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    result = CliRunner().invoke(cli, ["app"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: mediround app needs gradio, which the optional 'app' extra installs: pip install \"mediround[app]\"")


def test_a_wider_host_is_warned_about_and_the_shipped_model_is_noticed(monkeypatch):
    served = []
    monkeypatch.setattr(server, "require_gradio", lambda: None)  # the warning needs no gradio: the server is stubbed
    monkeypatch.setattr(server, "serve", lambda *args: served.append(args))
    result = CliRunner().invoke(cli, ["app", "--host", "0.0.0.0", "--port", "8123", "--beta", "off"])
    assert result.exit_code == 0, result.output
    assert "warning: --host 0.0.0.0: the page has no authentication" in result.stderr
    assert "using the shipped tiny model" in result.stderr
    [(_, folder, host, port, beta, jcm_rounds, model_name, notice)] = served
    folder.rmdir()  # made for the server, which removes it when it stops
    assert (host, port, beta, jcm_rounds, model_name) == ("0.0.0.0", 8123, None, None, None)
    assert "not for clinical or research use" in notice
    served.clear()
    result = CliRunner().invoke(cli, ["app", "--port", "8123", "--beta", "off"])
    assert "warning" not in result.stderr and served[0][2] == "127.0.0.1"
    served[0][1].rmdir()

"""Nothing reaches the network at run time: weights come from local folders only, and a hub name is refused
with the command that downloads it."""

from __future__ import annotations

import socket

import pytest
from click.testing import CliRunner
from reliability_fixtures import one_round, write_lines

from mediround.errors import CheckpointError
from mediround.model import build_model, preset
from mediround_cli.main import cli

HUB_NAME = "microsoft/llava-med-v1.5-mistral-7b"


@pytest.fixture
def no_network(monkeypatch):
    """Offline like a cluster node: the hub client is told so, and any socket connection is recorded and refused."""
    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network blocked by the test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_a_hub_name_as_base_model_asks_to_download_it_first(no_network):
    config = preset("tiny")
    config.mllm.source = HUB_NAME
    with pytest.raises(CheckpointError, match=r"looks like a model hub name.*nothing is downloaded.*huggingface-cli "
                                              r"download microsoft/llava-med-v1\.5-mistral-7b --local-dir"):
        build_model(config)
    assert no_network == []


def test_a_hub_name_as_sam_checkpoint_asks_to_download_it_first(no_network):
    config = preset("tiny")
    config.segmenter.checkpoint = "wanglab/medsam-vit-base"
    with pytest.raises(CheckpointError, match="looks like a model hub name"):
        build_model(config)
    assert no_network == []


def test_inference_from_a_local_checkpoint_opens_no_connection(no_network, tmp_path, dataset, tiny_checkpoint):
    data = write_lines(dataset / "offline.jsonl", [one_round("a")])
    result = CliRunner().invoke(
        cli, ["infer", str(data), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--cpu"])
    assert result.exit_code == 0, result.output
    assert no_network == []

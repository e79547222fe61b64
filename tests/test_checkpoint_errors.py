"""A bad `model.ckpt` (empty, truncated, not a checkpoint, from another config) is one `error:` line in every
script, never a traceback, and a mismatch says which config values differ."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import cli_inference
import evaluate
import train
from models.checkpoint import CheckpointError, read_checkpoint
from models.salmonn import SALMONN

REPO = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO / "configs/demo.yaml")


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the demo model in our format, with the config it was trained with."""
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO_CFG))
    model = SALMONN.from_config({**cfg["model"], "ckpt": ""})
    path = tmp_path_factory.mktemp("ckpt") / "good.pth"
    torch.save({"model": model.trainable_state_dict(), "config": cfg}, path)
    return path


@pytest.fixture(scope="module")
def bad_checkpoints(tmp_path_factory, good_checkpoint) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bad")
    paths = {name: folder / f"{name}.pth" for name in ("empty", "truncated", "text", "tensor")}
    paths["empty"].write_bytes(b"")
    paths["truncated"].write_bytes(good_checkpoint.read_bytes()[:1000])
    paths["text"].write_text("this is not a checkpoint\n")
    torch.save(torch.zeros(3), paths["tensor"])
    return paths


@pytest.mark.parametrize("name, reason", [("empty", "is empty (0 bytes)"), ("truncated", "not a readable checkpoint"),
                                          ("text", "not a readable checkpoint"), ("tensor", "holds a Tensor")])
def test_unusable_files_are_named_with_the_reason(bad_checkpoints, name, reason):
    with pytest.raises(CheckpointError, match=re.escape(reason)) as info:
        read_checkpoint(bad_checkpoints[name])
    assert str(bad_checkpoints[name]) in str(info.value)


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error")]  # (besides progress bars)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("name", ["empty", "truncated", "text"])
def test_every_script_turns_a_corrupt_checkpoint_into_one_line(bad_checkpoints, name, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.chdir(REPO)
    ckpt = f"model.ckpt={bad_checkpoints[name]}"
    wav = str(REPO / "data/demo/audio/task1_5/en_0005_0033_1.ogg")
    assert cli_inference.main(["--options", ckpt, "--wav", wav, "--prompt", "hi"]) == 2
    assert str(bad_checkpoints[name]) in one_error_line(capsys.readouterr().err)
    assert evaluate.main(["--options", ckpt, "--out-dir", str(tmp_path / "eval"), "--limit", "1"]) == 2
    assert str(bad_checkpoints[name]) in one_error_line(capsys.readouterr().err)
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", ckpt, f"run.output_dir={tmp_path / 'run'}"]) == 2
    assert str(bad_checkpoints[name]) in one_error_line(capsys.readouterr().err)


def test_a_checkpoint_from_another_config_says_what_differs(good_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    options = [f"model.ckpt={good_checkpoint}", "model.lora_rank=4", f"run.output_dir={tmp_path / 'run'}"]
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", *options]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "has shape" in line and "lora_A" in line
    rank = OmegaConf.load(DEMO_CFG).model.lora_rank
    assert f"the checkpoint was trained with model.lora_rank={rank} (this config: 4)" in line
    wav = str(REPO / "data/demo/audio/task1_5/en_0005_0033_1.ogg")
    assert cli_inference.main(["--options", *options[:2], "--wav", wav, "--prompt", "hi"]) == 2
    assert f"model.lora_rank={rank} (this config: 4)" in one_error_line(capsys.readouterr().err)


def test_the_matching_checkpoint_loads(good_checkpoint):
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO_CFG))["model"]
    model = SALMONN.from_config({**cfg, "ckpt": str(good_checkpoint)})
    saved = torch.load(good_checkpoint, weights_only=True)["model"]
    assert all(torch.equal(model.trainable_state_dict()[k], v) for k, v in saved.items())

"""The original SALMONN's configs, unchanged: its config.yaml and decode_config.yaml (written here from their key
list and values) load, run until the weights are needed and then name what to download where, and `--dryrun`
trains on them with the tiny model. Also the original's run keys (amp, use_distributed, world_size, dist_url)
with their original meaning, checked against torchrun's environment."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

import cli_inference
import train
from config import ConfigError, load_config
from utils import check_launch

ROOT = Path(__file__).resolve().parents[1]

# The original's configs/config.yaml and configs/decode_config.yaml: every key, with its value there.
ORIGINAL_MODEL = {
    "llama_path": "path to llama model", "whisper_path": "path to whisper model",
    "beats_path": "path to beats model", "ckpt": "model ckpt",
    "freeze_whisper": True, "freeze_beats": True,
    "use_speech_Qformer": True, "freeze_speech_QFormer": False, "window_level_Qformer": True,
    "num_speech_query_token": 1, "second_per_window": 0.333333, "second_stride": 0.333333,
    "speech_llama_proj_model": "", "freeze_speech_llama_proj": False,
    "lora": True, "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1,
    "multi_prompt": True, "prompt_template": "USER: {}\nASSISTANT:", "prompt_path": "prompts/train_prompt.json",
    "test_prompt_path": "prompts/test_prompt.json", "max_txt_len": 300, "end_sym": "</s>",
}
ORIGINAL_CONFIG = {
    "model": ORIGINAL_MODEL,
    "datasets": {"train_ann_path": "path to train data", "valid_ann_path": "path to valid data",
                 "test_ann_path": "path to test data", "whisper_path": "path to whisper model"},
    "run": {"seed": 42, "output_dir": "output directory", "evaluate": False, "log_freq": 5, "epoch_based": False,
            "iters_per_epoch": 3000, "accum_grad_iters": 1, "batch_size_train": 8, "batch_size_eval": 8,
            "num_workers": 8, "device": "cuda", "use_distributed": True, "amp": True, "world_size": 1,
            "dist_url": "env://",
            "optims": {"max_epoch": 30, "warmup_steps": 3000, "warmup_start_lr": 1e-6, "init_lr": 3e-5,
                       "min_lr": 1e-5, "weight_decay": 0.05, "beta2": 0.999}},
}
ORIGINAL_DECODE = {
    "model": ORIGINAL_MODEL,
    "generate": {"max_new_tokens": 200, "num_beams": 4, "do_sample": False, "min_length": 1, "temperature": 1.0,
                 "top_p": 0.9, "repetition_penalty": 1.0, "length_penalty": 1.0},
}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A folder laid out as the original repo is used: its configs, the prompts folder, single-clip data (the
    original's annotation format, relative paths under an audio root, no `task`)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts").symlink_to(ROOT / "prompts")
    for name, config in (("config.yaml", ORIGINAL_CONFIG), ("decode_config.yaml", ORIGINAL_DECODE)):
        (tmp_path / name).write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    audio = tmp_path / "LibriSpeech"
    audio.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        sf.write(audio / f"utt{i}.flac", rng.normal(0, 0.1, 24000).astype(np.float32), 16000)
    for name, clips in (("train_a.json", [0, 1]), ("train_b.json", [2]), ("valid.json", [0])):
        entries = [{"path": f"utt{i}.flac", "text": f"chapter {i} of the book"} for i in clips]
        (tmp_path / name).write_text(json.dumps({"annotation": entries}), encoding="utf-8")
    return tmp_path


DATA = ["datasets.train_ann_path=[train_a.json,train_b.json]", "datasets.valid_ann_path=valid.json",
        "datasets.test_ann_path=valid.json", "datasets.prefix=LibriSpeech"]


def test_the_original_configs_load_with_their_meaning(workdir):
    cfg = load_config("config.yaml")
    assert cfg.run.precision == "auto" and cfg.run.amp is None  # amp: true -> the half precision of the GPU
    assert (cfg.run.use_distributed, cfg.run.world_size, cfg.run.dist_url) == (True, 1, "env://")
    assert cfg.model.llm_path == "path to llama model" and cfg.datasets.whisper_path == "path to whisper model"
    decode = load_config("decode_config.yaml")
    assert decode.generate.num_beams == 4 and "datasets" not in decode


def test_decode_config_names_what_to_download_where(workdir, capsys):
    wav = str(workdir / "LibriSpeech" / "utt0.flac")
    assert cli_inference.main(["--cfg-path", "decode_config.yaml", "--wav", wav, "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Download " in err[0] and "'path to " in err[0]


def test_config_names_what_to_download_where(workdir, capsys):
    device = [] if torch.cuda.is_available() else ["run.device=cpu"]  # the original's cuda, on a CPU-only machine
    assert train.cli(["--cfg-path", "config.yaml", "--options", *DATA, *device]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "Download " in err[-1] and "'path to " in err[-1]


def test_dryrun_trains_the_tiny_model_on_the_original_config(workdir):
    """The user's data and run settings, whatever model and datasets.whisper_path say: the original's device
    (cuda) falls back to the CPU when there is none; the steps are cut to two on the command line."""
    options = [*DATA, "run.iters_per_epoch=2", "run.optims.max_epoch=1", "run.num_workers=0"]
    assert train.cli(["--cfg-path", "config.yaml", "--dryrun", "--options", *options]) == 0
    out = workdir / "output directory_dryrun"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["datasets"]["whisper_path"] is None and resolved["model"]["whisper_path"].endswith("whisper_5s")
    assert resolved["run"]["precision"] == "auto" and resolved["run"]["batch_size_train"] == 8
    log = (out / "train.log").read_text()
    assert "train split: 3 samples" in log and "valid split: 1 samples" in log
    assert (out / "checkpoint_best.pth").is_file()


@pytest.mark.parametrize("options, message", [
    (["run.amp=true", "run.precision=fp32"], "run.amp: true and run.precision: fp32 disagree"),
    (["run.use_distributed=maybe"], "`run.use_distributed` must be bool"),
    (["run.world_size=true"], "`run.world_size` must be int"),
    (["datasets.prefix=a", "datasets.data_prefix=b"], "datasets.prefix ('a') and datasets.data_prefix ('b')"),
    (["datasets.train_ann_path=[]"], "a file or a non-empty list of files"),
    (["generate.end_sym=x"], "set it there"),
    (["run.exp_name=x"], "TensorBoard in run.output_dir"),
])
def test_original_keys_that_contradict_fail_naming_them(workdir, options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config("config.yaml", options)


def test_amp_false_is_fp32_and_data_prefix_is_prefix(workdir):
    cfg = load_config("config.yaml", ["run.amp=false", "datasets.data_prefix=/audio"])
    assert cfg.run.precision == "fp32" and (cfg.datasets.prefix, cfg.datasets.data_prefix) == ("/audio", "")


TORCHRUN_2 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("keys, environ, message", [
    ((True, 1, "env://"), {}, None),  # the original's values, started with python: one process, as it did
    ((True, None, None), TORCHRUN_2, None),
    ((None, 2, "tcp://10.0.0.1:29500"), TORCHRUN_2, None),
    ((False, None, None), TORCHRUN_2, "run.use_distributed is false, but torchrun started 2 process"),
    ((True, 8, None), TORCHRUN_2, "run.world_size is 8, but torchrun started 2 process"),
    ((True, 2, "tcp://10.0.0.9:1234"), TORCHRUN_2, "run.dist_url is 'tcp://10.0.0.9:1234', but torchrun's"),
    ((True, 2, None), {**TORCHRUN_2, "WORLD_SIZE": "1"}, "run.world_size is 2, but torchrun started 1 process"),
])
def test_launch_keys_are_checked_against_torchrun(keys, environ, message):
    if message is None:
        check_launch(*keys, environ)
    else:
        with pytest.raises(ConfigError, match=message):
            check_launch(*keys, environ)


def test_without_torchrun_a_larger_world_size_is_one_process_with_a_warning(caplog):
    """Nota's stage configs say world_size: 2 and are dry-run with python, as the original allowed."""
    with caplog.at_level(logging.WARNING):
        check_launch(True, 2, "env://", {})
    assert "run.world_size is 2, but the script was started without torchrun: one process" in caplog.text

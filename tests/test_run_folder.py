"""One run per output folder, atomic checkpoints and exact resume (issue 22, cases 3, 6 and 7): a second run into a
held folder stops naming the holder; a checkpoint write that fails leaves no temporary file; a kill -9 of the demo
config as shipped (encoder cache on) resumes bit-exact; a resume with other settings is refused unless asked; a
cut last line of metrics.jsonl is dropped with a warning."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import runner
import train
from config import load_config
from models.salmonn import SALMONN

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs/demo.yaml")


def tiny_corpus(folder: Path, count: int = 8) -> Path:
    """Single-clip ASR samples (tones of 1-2 s) in the original annotation format: train.json and valid.json."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(count):
        t = np.arange(int(16000 * (1.0 + 0.25 * (i % 5)))) / 16000
        sf.write(folder / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 30 * i) * t)).astype(np.float32), 16000)
        entries.append({"id": f"utt{i}", "path": f"clip{i}.wav", "text": f"word {i}", "task": "asr"})
    (folder / "train.json").write_text(json.dumps({"annotation": entries[2:]}))
    (folder / "valid.json").write_text(json.dumps({"annotation": entries[:2]}))
    return folder


def options(corpus: Path, out: Path, **run: object) -> list[str]:
    """configs/demo.yaml on the tiny corpus, a few steps of batch 2 (override run keys with **run, `__` for `.`)."""
    settings = {"output_dir": str(out), "num_workers": 0, "batch_size_train": 2, "batch_size_eval": 2,
                "epoch_based": False, "iters_per_epoch": 2, "valid_decode_samples": 0, "save_every_steps": 1,
                "keep_last": 10, "optims.max_epoch": 2, "optims.warmup_steps": 2, "optims.init_lr": 1e-3}
    settings.update({k.replace("__", "."): v for k, v in run.items()})
    return [f"datasets.train_ann_path={corpus / 'train.json'}", f"datasets.valid_ann_path={corpus / 'valid.json'}",
            *(f"run.{k}={v}" for k, v in settings.items())]


def train_cli(*args: str) -> int:
    return train.cli(["--cfg-path", DEMO_CFG, *args])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def finished(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 4-step run with a checkpoint after every step."""
    out = tmp_path_factory.mktemp("finished")
    assert train_cli("--options", *options(corpus, out)) == 0
    return out


# ---------------------------------------------------------------------------------------------- case 3
def test_a_second_run_into_a_held_folder_stops_naming_the_holder(corpus: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    long_run = options(corpus, out, iters_per_epoch=10_000, save_every_steps=0)
    holder = subprocess.Popen([sys.executable, "train.py", "--cfg-path", DEMO_CFG, "--options", *long_run],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while "training:" not in ((out / "train.log").read_text() if (out / "train.log").exists() else ""):
            assert holder.poll() is None, "the first run ended before the second started"
            assert time.monotonic() < deadline, "the first run never started training"
            time.sleep(0.1)
        assert train_cli("--options", *options(corpus, out, iters_per_epoch=1, optims__max_epoch=1)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"pid {holder.pid}" in err and "in use" in err
        assert holder.poll() is None  # the holder runs on, untouched
    finally:
        holder.kill()
        holder.wait()
    assert not (out / "checkpoint_step1.pth").exists()  # the refused run trained nothing


def test_checkpoint_temp_files_carry_the_writers_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = []
    save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (names.append(Path(f.name).name), save(obj, f)))
    runner.atomic_save({"step": 1}, tmp_path / "checkpoint_step1.pth")
    assert len(names) == 1 and str(os.getpid()) in names[0] and not names[0].startswith("checkpoint_step")
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_step1.pth"]


def test_a_full_disk_leaves_no_temp_file_and_says_so_in_one_line(corpus: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    def disk_full(obj, f):
        f.write(b"the first bytes of a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4352 vs 4240")

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "run"
    assert train_cli("--options", *options(corpus, out, iters_per_epoch=1, optims__max_epoch=1)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]  # (progress bars go there too)
    assert len(errors) == 1 and "Traceback" not in err
    assert "checkpoint_step1.pth" in errors[0] and "free" in errors[0]
    assert sorted(p.name for p in out.glob("*checkpoint*")) == []  # no checkpoint, no temporary file


# ---------------------------------------------------------------------------------------------- case 6
def demo_clips(*seconds: float) -> dict:
    """A padded batch of tone+noise clips, as the collate gives it: spectrograms, samples and the padding mask."""
    from dataset_v1 import load_feature_extractor

    rng = np.random.default_rng(len(seconds))
    waves = [(0.1 * np.sin(2 * np.pi * 300 * np.arange(int(s * 16000)) / 16000)
              + 0.02 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    raw = torch.zeros(len(waves), max(len(w) for w in waves))
    pad = torch.ones(raw.shape, dtype=torch.bool)
    for i, w in enumerate(waves):
        raw[i, : len(w)], pad[i, : len(w)] = torch.from_numpy(w), False
    fe = load_feature_extractor(str(ROOT / load_config(DEMO_CFG).model.whisper_path))
    spec = torch.from_numpy(fe(waves, sampling_rate=16000, return_tensors="np").input_features)
    return {"spectrogram": spec, "raw_wav": raw, "audio_padding_mask": pad}


def test_cached_encoder_features_do_not_depend_on_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the demo caches for a clip is the same bits whether the clip came alone or padded in a batch (BEATs'
    output depends on the padded length: caching a clip's first batch's features broke exact resume)."""
    monkeypatch.chdir(ROOT)
    model_cfg = load_config(DEMO_CFG).model
    assert model_cfg.cache_frozen_encoders  # the demo as shipped
    batched, alone = (SALMONN.from_config(model_cfg).eval() for _ in range(2))
    batch = demo_clips(1.3, 4.2, 2.6)
    with torch.no_grad():
        batched.cached_encoder_outputs(**batch)
        for row in range(3):
            samples = int((~batch["audio_padding_mask"][row]).sum())  # as a batch of this clip alone comes
            alone.cached_encoder_outputs(batch["spectrogram"][row:row + 1], batch["raw_wav"][row:row + 1, :samples],
                                         batch["audio_padding_mask"][row:row + 1, :samples])
    assert batched.encoder_cache.keys() == alone.encoder_cache.keys() and len(alone.encoder_cache) == 3
    for key, (speech, patches) in batched.encoder_cache.items():
        assert torch.equal(speech, alone.encoder_cache[key][0])
        assert torch.equal(patches, alone.encoder_cache[key][1])


def test_kill_9_of_the_demo_config_as_shipped_resumes_bit_exact(tmp_path: Path) -> None:
    """configs/demo.yaml (the demo corpus, model.cache_frozen_encoders: true) for two epochs, checkpoints every
    step: killed by SIGKILL in the first epoch, then --resume auto, it ends with the uninterrupted run's weights,
    optimizer state and losses, to the bit. The resumed run's cache starts empty, so the clips of the steps before
    the kill are encoded again in the second epoch's batches."""
    run = ["run.optims.max_epoch=2", "run.save_every_steps=1", "run.keep_last=30", "run.valid_decode_samples=0"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert train_cli("--options", *run, f"run.output_dir={whole}") == 0
    steps = runner.step_checkpoints(whole)[-1][0]
    kill_after = random.randint(1, steps // 2 - 2)  # in the first epoch: its clips come back in the second
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg-path", DEMO_CFG, "--options", *run,
                             f"run.output_dir={killed}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (killed / f"checkpoint_step{kill_after}.pth").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint to resume from appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = runner.step_checkpoints(killed)[-1][0]
    assert killed_at < steps // 2

    assert train_cli("--resume", "auto", "--options", *run, f"run.output_dir={killed}") == 0
    expected, resumed = load(whole / f"checkpoint_step{steps}.pth"), load(killed / f"checkpoint_step{steps}.pth")
    assert expected["model"].keys() == resumed["model"].keys()
    for key in expected["model"]:
        assert torch.equal(expected["model"][key], resumed["model"][key]), f"{key} (killed after step {killed_at})"
    for key, state in expected["optimizer"]["state"].items():
        assert all(torch.equal(v, resumed["optimizer"]["state"][key][k]) for k, v in state.items())
    train_losses = [[(r["step"], r["loss"]) for r in metrics(out) if r["kind"] == "train"] for out in (whole, killed)]
    assert train_losses[0] == train_losses[1]


# ---------------------------------------------------------------------------------------------- case 7
@pytest.mark.parametrize("change, named", [
    ("run.optims.init_lr=2e-3", "run.optims.init_lr: 0.001 -> 0.002"),
    ("run.seed=7", "run.seed: 42 -> 7"),
    ("run.batch_size_train=3", "run.batch_size_train: 2 -> 3"),
])
def test_resuming_with_other_settings_is_refused_naming_them(corpus: Path, finished: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, change: str,
                                                             named: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for path in finished.glob("checkpoint_step[12].pth"):
        (out / path.name).write_bytes(path.read_bytes())
    (out / "config.yaml").write_text((finished / "config.yaml").read_text())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert train_cli("--resume", "auto", "--options", *options(corpus, out), change) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and "--resume-with-changes" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # config.yaml and checkpoints untouched


def test_resuming_on_changed_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tiny_corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert train_cli("--options", *options(data, out, optims__max_epoch=1)) == 0
    (out / "checkpoint_step2.pth").unlink()
    entries = json.loads((data / "train.json").read_text())["annotation"]
    (data / "train.json").write_text(json.dumps({"annotation": entries[::-1]}))  # same path, other order
    assert train_cli("--resume", "auto", "--options", *options(data, out, optims__max_epoch=1)) == 2
    assert "datasets.train_ann_path" in capsys.readouterr().err


def test_resume_with_changes_follows_the_new_schedule_and_keeps_the_first_config(corpus: Path, finished: Path,
                                                                                 tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint_step2.pth").write_bytes((finished / "checkpoint_step2.pth").read_bytes())
    (out / "config.yaml").write_text((finished / "config.yaml").read_text())
    assert train_cli("--resume", "auto", "--resume-with-changes", "--options",
                     *options(corpus, out, optims__init_lr=2e-3)) == 0
    lrs = {r["step"]: r["lr"] for r in metrics(out) if r["kind"] == "train"}
    total = 4  # max_epoch 2 x iters_per_epoch 2
    assert lrs == {step: pytest.approx(runner.warmup_cosine_lr(step - 1, total, 2, 1e-5, 2e-3, 1e-5), rel=1e-12)
                   for step in (3, 4)}
    assert (out / "config.yaml").read_text() == (finished / "config.yaml").read_text()
    assert "init_lr: 0.002" in (out / "config_from_step2.yaml").read_text()
    assert "run.optims.init_lr: 0.001 -> 0.002" in (out / "train.log").read_text()


def test_a_cut_last_metrics_line_is_dropped_with_a_warning(corpus: Path, finished: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    for path in finished.iterdir():
        if path.is_file() and path.name != "checkpoint_step4.pth":
            (out / path.name).write_bytes(path.read_bytes())
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a power loss mid-line
    assert train_cli("--resume", "auto", "--options", *options(corpus, out)) == 0
    assert "last line cut short" in (out / "train.log").read_text()
    assert [r["step"] for r in metrics(out) if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["loss"] for r in metrics(out)] == [r["loss"] for r in metrics(finished)]

"""The training recipe on the tiny model: schedule, exact resume (in-process crash and a real SIGKILL),
accumulation == big batch, non-finite loss handling, atomic checkpoints, decoding to JSON."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
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
from runner import atomic_save, length_grouped_indices, param_groups, warmup_cosine_lr

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(ROOT / "configs/demo.yaml")
WORDS = ["hello world", "good morning", "the cat sat down", "open the door", "i am happy", "see you soon"]


def make_corpus(folder: Path, num_train: int = 10, num_valid: int = 2, num_test: int = 3) -> Path:
    """Short single-clip ASR samples (1-2 s tones + noise) in the original annotation format."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(num_train + num_valid + num_test):
        t = np.arange(int(16000 * (1.0 + 0.5 * (i % 3)))) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (200 + 40 * (i % 6)) * t) + 0.01 * rng.standard_normal(len(t))
        sf.write(folder / f"clip{i}.wav", wav.astype(np.float32), 16000)
        entries.append({"id": f"utt{i}", "path": f"clip{i}.wav", "text": WORDS[i % len(WORDS)], "task": "asr"})
    splits = {"train": entries[:num_train], "valid": entries[num_train:num_train + num_valid],
              "test": entries[num_train + num_valid:]}
    for split, items in splits.items():
        (folder / f"{split}.json").write_text(json.dumps({"annotation": items}))
    return folder


def corpus_options(corpus: Path, output_dir: Path, **run: object) -> list[str]:
    """Options for a small, fast run of configs/demo.yaml on `corpus` (override run keys with **run)."""
    settings = {"output_dir": str(output_dir), "num_workers": 0, "batch_size_train": 2, "batch_size_eval": 2,
                "epoch_based": False, "iters_per_epoch": 3, "valid_decode_samples": 0, "best_metric": "acc",
                "best_metric_mode": "max", "save_every_steps": 0, "keep_last": 2, "nonfinite_loss": "stop",
                "log_freq": 1, "optims.max_epoch": 2, "optims.warmup_steps": 2,
                "optims.init_lr": 1e-3, "optims.min_lr": 1e-4}
    settings.update({k.replace("__", "."): v for k, v in run.items()})
    return [f"datasets.train_ann_path={corpus / 'train.json'}", f"datasets.valid_ann_path={corpus / 'valid.json'}",
            f"datasets.test_ann_path={corpus / 'test.json'}", "generate.max_new_tokens=4", "generate.num_beams=1",
            *(f"run.{k}={v}" for k, v in settings.items())]


def run_train(options: list[str]) -> int:
    return train.main(["--cfg-path", DEMO_CFG, "--options", *options])


def train_losses(output_dir: Path) -> list[tuple[int, float]]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if atol == 0.0:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def no_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropout masks depend on how samples are grouped into batches; equality tests switch it off."""
    build = train.build_model

    def build_without_dropout(cfg):
        model = build(cfg)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):  # functional attention dropout
                module.attention_dropout = 0.0
        return model

    monkeypatch.setattr(train, "build_model", build_without_dropout)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


# Resume runs: 6 steps of 2 micro-batches of 2 (10 samples: steps straddle data epochs), an epoch is 3 steps
# (validation + checkpoint), a checkpoint every step, dropout on (so the RNG state matters).
RESUME_RUN = dict(accum_grad_iters=2, iters_per_epoch=3, optims__max_epoch=2, save_every_steps=1, keep_last=2)
TOTAL_STEPS = 6


@pytest.fixture(scope="module")
def uninterrupted(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert run_train(corpus_options(corpus, out, **RESUME_RUN)) == 0
    return out


# ------------------------------------------------------------------------------------------------ pure parts


def test_schedule_is_the_originals_warmup_then_cosine() -> None:
    kw = dict(total_steps=100, warmup_steps=10, warmup_start_lr=1e-6, init_lr=1e-4, min_lr=1e-5)
    assert warmup_cosine_lr(0, **kw) == pytest.approx(1e-6)
    assert warmup_cosine_lr(5, **kw) == pytest.approx(1e-6 + (1e-4 - 1e-6) * 0.5)
    assert warmup_cosine_lr(50, **kw) == pytest.approx(1e-5 + (1e-4 - 1e-5) * 0.5)  # cos(pi/2): the midpoint
    assert warmup_cosine_lr(100, **kw) == pytest.approx(1e-5)
    lrs = [warmup_cosine_lr(s, **kw) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def padded_lengths(lengths: list[float], batches: list[list[int]]) -> float:
    """What a batch costs when padded to its longest sample, summed over the batches."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def test_length_grouped_batches_are_alike_shuffled_and_shared_out_like_distributed_sampler() -> None:
    rng = random.Random(0)
    lengths = [rng.choice([rng.uniform(1, 5), rng.uniform(10, 25)]) for _ in range(801)]  # single turns, dialogues
    batch, world = 4, 2
    shares = [length_grouped_indices(lengths, batch, world, rank, seed=7) for rank in range(world)]
    assert len(shares[0]) == len(shares[1]) == 401  # 801 samples padded to 802, as DistributedSampler pads
    assert set(shares[0] + shares[1]) == set(range(801))  # every sample, one of them twice
    assert shares[0] == length_grouped_indices(lengths, batch, world, 0, seed=7)  # fixed by (seed, data epoch)
    assert shares[0] != length_grouped_indices(lengths, batch, world, 0, seed=8)
    grouped = [[s[k:k + batch] for k in range(0, len(s), batch)] for s in shares]
    shuffled = list(range(801))
    rng.shuffle(shuffled)
    random_batches = [shuffled[k:k + batch] for k in range(0, 801, batch)]
    assert padded_lengths(lengths, grouped[0] + grouped[1]) < 0.8 * padded_lengths(lengths, random_batches)
    # the ranks' batches of one step are alike too (a rank never waits on a much longer batch)
    step_gap = [abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) for a, b in zip(*grouped)]
    assert sum(step_gap) / len(step_gap) < 1.0


def test_no_weight_decay_on_norms_and_biases() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model[0].weight)]
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[2].bias)}


def test_atomic_save_keeps_the_last_good_file_when_a_write_dies(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint_step1.pth"
    atomic_save({"step": 1, "w": torch.ones(3)}, path)

    def dying_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load(path)["step"] == 1 and torch.equal(load(path)["w"], torch.ones(3))
    assert runner.step_checkpoints(tmp_path) == [(1, path)]  # the .tmp leftover is never taken for a checkpoint


# ------------------------------------------------------------------------------------------------ training


def test_demo_run_learns_and_writes_checkpoint_logs_and_config(uninterrupted: Path) -> None:
    losses = [loss for _, loss in train_losses(uninterrupted)]
    assert len(losses) == TOTAL_STEPS
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1
    assert (uninterrupted / "train.log").read_text().count("step ") >= TOTAL_STEPS
    assert (uninterrupted / "config.yaml").is_file()
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    best = load(uninterrupted / "checkpoint_best.pth")
    assert best["best"]["metric"] == "acc" and best["valid"]["acc"] == best["best"]["value"]
    final = load(uninterrupted / f"checkpoint_step{TOTAL_STEPS}.pth")
    assert final["step"] == TOTAL_STEPS and final["epoch"] == 2
    assert {"model", "optimizer", "scheduler", "scaler", "config", "rng", "data_position"} <= final.keys()
    # The original's key names, and only trained tensors.
    assert any(k.startswith("speech_Qformer.bert.encoder.layer.0.crossattention.self.") for k in final["model"])
    assert any(".lora_A.default.weight" in k for k in final["model"])
    assert not any(k.startswith(("speech_encoder.", "beats.")) for k in final["model"])
    # keep_last=2: older step checkpoints were pruned.
    assert [step for step, _ in runner.step_checkpoints(uninterrupted)] == [TOTAL_STEPS - 1, TOTAL_STEPS]


def crash_then_resume(corpus: Path, out: Path, run: dict, crash_at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trains until step `crash_at` dies halfway (after its first micro-batch), then resumes to the end."""
    step = runner.Runner.train_step

    def train_step_that_dies(self, micro_batches):
        if self.step + 1 == crash_at:
            self.wrapped(micro_batches[0])["loss_sum"].backward()
            raise KeyboardInterrupt(f"simulated crash in step {crash_at}")
        return step(self, micro_batches)

    monkeypatch.setattr(runner.Runner, "train_step", train_step_that_dies)
    with pytest.raises(KeyboardInterrupt):
        run_train(corpus_options(corpus, out, **run))
    monkeypatch.setattr(runner.Runner, "train_step", step)
    assert run_train(corpus_options(corpus, out, **run, resume="auto")) == 0


def test_resume_after_a_crash_at_a_random_step_equals_uninterrupted(
        corpus: Path, uninterrupted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash_at = random.randint(2, TOTAL_STEPS)
    # Checkpoints every 2 steps: after a crash in an even step the log holds a step the checkpoint has not.
    crash_then_resume(corpus, tmp_path, {**RESUME_RUN, "save_every_steps": 2}, crash_at, monkeypatch)
    expected = load(uninterrupted / f"checkpoint_step{TOTAL_STEPS}.pth")
    resumed = load(tmp_path / f"checkpoint_step{TOTAL_STEPS}.pth")
    assert_same_tensors(expected["model"], resumed["model"])
    assert expected["optimizer"]["state"].keys() == resumed["optimizer"]["state"].keys()
    for key, state in expected["optimizer"]["state"].items():
        assert_same_tensors(state, resumed["optimizer"]["state"][key])
    assert train_losses(tmp_path) == train_losses(uninterrupted), f"crash at step {crash_at}"
    assert expected["data_position"] == resumed["data_position"]


def test_length_grouped_run_resumes_exactly(corpus: Path, uninterrupted: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    grouped = {**RESUME_RUN, "group_by_length": True, "save_every_steps": 2}
    assert run_train(corpus_options(corpus, tmp_path / "whole", **grouped)) == 0
    assert train_losses(tmp_path / "whole") != train_losses(uninterrupted)  # other batches than the shuffled run's
    crash_then_resume(corpus, tmp_path / "resumed", grouped, crash_at=5, monkeypatch=monkeypatch)
    assert_same_tensors(load(tmp_path / "whole" / f"checkpoint_step{TOTAL_STEPS}.pth")["model"],
                        load(tmp_path / "resumed" / f"checkpoint_step{TOTAL_STEPS}.pth")["model"])
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "whole")


def test_resume_after_sigkill_equals_uninterrupted(corpus: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """A real `kill -9` of train.py while it runs (possibly mid-write), then --resume auto."""
    kill_after = random.randint(1, TOTAL_STEPS - 2)
    options = corpus_options(corpus, tmp_path, **RESUME_RUN)
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg-path", DEMO_CFG, "--options", *options], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (tmp_path / f"checkpoint_step{kill_after}.pth").exists():
        assert proc.poll() is None, "train.py ended before it was killed"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = runner.step_checkpoints(tmp_path)[-1][0]
    assert killed_at < TOTAL_STEPS, "the run finished before the kill; nothing was resumed"

    assert train.main(["--cfg-path", DEMO_CFG, "--resume", "auto", "--options", *options]) == 0
    expected = load(uninterrupted / f"checkpoint_step{TOTAL_STEPS}.pth")
    resumed = load(tmp_path / f"checkpoint_step{TOTAL_STEPS}.pth")
    assert_same_tensors(expected["model"], resumed["model"])
    assert train_losses(tmp_path) == train_losses(uninterrupted), f"killed after step {killed_at}"
    assert f"resumed at step {killed_at}" in (tmp_path / "train.log").read_text()


# One optimizer step whose update shows the gradient itself: Adam's first step is lr * g / (|g| + eps), i.e.
# lr * sign(g) for the default eps (rounding noise in a near-zero gradient can flip it, and a wrongly scaled
# gradient goes unseen); with eps = 1 it is close to lr * g. No clipping: it would hide a scale error too.
ONE_LINEAR_STEP = dict(iters_per_epoch=1, optims__max_epoch=1, optims__warmup_steps=0, optims__init_lr=1e-2,
                       optims__eps=1.0, grad_clip=0)


def test_accumulation_equals_one_big_batch(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_dropout(monkeypatch)
    one_step = ONE_LINEAR_STEP
    assert run_train(corpus_options(corpus, tmp_path / "big", batch_size_train=4, **one_step)) == 0
    assert run_train(corpus_options(corpus, tmp_path / "acc", batch_size_train=2, accum_grad_iters=2,
                                    **one_step)) == 0
    big, acc = load(tmp_path / "big/checkpoint_step1.pth"), load(tmp_path / "acc/checkpoint_step1.pth")
    assert_same_tensors(big["model"], acc["model"], atol=1e-6)
    np.testing.assert_allclose([x for _, x in train_losses(tmp_path / "big")],
                               [x for _, x in train_losses(tmp_path / "acc")], rtol=1e-6)


def nan_at_step(monkeypatch: pytest.MonkeyPatch, bad_step: int) -> None:
    """The model's loss becomes NaN in the forward passes of optimizer step `bad_step`."""
    build = train.build_model

    def build_with_nan(cfg):
        model = build(cfg)
        forward, calls = model.forward, {"n": 0}

        def forward_with_nan(samples):
            calls["n"] += model.training
            out = forward(samples)
            if model.training and calls["n"] == bad_step:
                out["loss_sum"] = out["loss_sum"] * float("nan")
            return out

        model.forward = forward_with_nan
        return model

    monkeypatch.setattr(train, "build_model", build_with_nan)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(
        corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nan_at_step(monkeypatch, bad_step=3)
    options = corpus_options(corpus, tmp_path, save_every_steps=1, keep_last=3, optims__max_epoch=1)
    assert run_train(options) == 1
    assert "non-finite loss (nan) at step 3" in (tmp_path / "train.log").read_text()
    assert [step for step, _ in runner.step_checkpoints(tmp_path)] == [1, 2]
    assert load(tmp_path / "checkpoint_step2.pth")["step"] == 2


def test_nan_loss_skip_mode_counts_and_continues(corpus: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    nan_at_step(monkeypatch, bad_step=2)
    assert run_train(corpus_options(corpus, tmp_path, nonfinite_loss="skip", save_every_steps=1, keep_last=3,
                                    optims__max_epoch=1)) == 0
    one, two = load(tmp_path / "checkpoint_step1.pth"), load(tmp_path / "checkpoint_step2.pth")
    assert two["skipped_steps"] == 1
    assert_same_tensors(one["model"], two["model"])  # the skipped step changed nothing
    assert load(tmp_path / "checkpoint_step3.pth")["skipped_steps"] == 1
    assert [record["skipped"] for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
            if record["kind"] == "train"] == [False, True, False]


def test_bad_run_value_fails_before_training(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"run.keep_last` must be in \[1, inf\)"):
        run_train(corpus_options(corpus, tmp_path, keep_last=0))
    with pytest.raises(FileNotFoundError, match="run.resume: checkpoint not found"):
        run_train(corpus_options(corpus, tmp_path, resume=str(tmp_path / "missing.pth")))


def test_a_fresh_run_never_overwrites_an_existing_one(corpus: Path, uninterrupted: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    old_run = tmp_path / "run"
    shutil.copytree(uninterrupted, old_run)
    before = {p.name: p.read_bytes() for p in old_run.iterdir() if p.is_file()}
    assert train.cli(["--cfg-path", DEMO_CFG, "--options", *corpus_options(corpus, old_run, **RESUME_RUN)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: run.output_dir '{old_run}' already holds a run (checkpoint_best.pth")
    assert "--resume auto" in err and len(err.splitlines()) == 1
    assert {p.name: p.read_bytes() for p in old_run.iterdir() if p.is_file()} == before  # nothing touched
    # Asked to, it continues the run that is there (already finished: no step is added).
    assert run_train([*corpus_options(corpus, old_run, **RESUME_RUN), "run.resume=auto"]) == 0
    assert [step for step, _ in runner.step_checkpoints(old_run)] == [TOTAL_STEPS - 1, TOTAL_STEPS]


def test_evaluate_decodes_the_test_split_from_a_trained_checkpoint(corpus: Path, uninterrupted: Path,
                                                                    tmp_path: Path) -> None:
    ckpt = uninterrupted / "checkpoint_best.pth"
    assert run_train([*corpus_options(corpus, tmp_path, evaluate=True), f"model.ckpt={ckpt}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "eval_test" / "predictions.jsonl").read_text().splitlines()]
    test_ids = [e["id"] for e in json.loads((corpus / "test.json").read_text())["annotation"]]
    assert [r["id"] for r in records] == test_ids
    for record in records:
        assert {"id", "task", "prompt", "prediction", "reference"} <= set(record)
        assert "<SpeechHere>" in record["prompt"] and isinstance(record["prediction"], str)
    written = json.loads((tmp_path / "eval_test" / "scores.json").read_text())
    assert "asr/en/wer" in written["scores"]
    assert written["checkpoint"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert written["checkpoint"]["bytes"] == ckpt.stat().st_size
    assert all(r["checkpoint_sha256"] == written["checkpoint"]["sha256"] for r in records)
    assert not (tmp_path / "checkpoint_best.pth").exists()


def test_validation_decodes_a_subset_and_picks_best_by_a_task_metric(corpus: Path, tmp_path: Path) -> None:
    options = corpus_options(corpus, tmp_path, optims__max_epoch=2, iters_per_epoch=1, valid_decode_samples=1,
                             best_metric="asr/en/wer", best_metric_mode="min")
    assert run_train(options) == 0
    valid = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "valid"]
    assert [v["step"] for v in valid] == [1, 2] and all("asr/en/wer" in v and "acc" in v for v in valid)
    best = load(tmp_path / "checkpoint_best.pth")
    assert best["best"]["value"] == min(v["asr/en/wer"] for v in valid)


def test_dryrun_runs_the_users_config_with_the_tiny_model(corpus: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    options = [*corpus_options(corpus, tmp_path / "run", iters_per_epoch=1, optims__max_epoch=1),
               "run.accum_grad_iters=1", "run.resume=''"]
    assert train.main(["--cfg-path", "configs/config.yaml", "--dryrun", "--options", *options]) == 0
    assert not (tmp_path / "run").exists()  # the real run's folder stays untouched
    saved = (tmp_path / "run_dryrun" / "config.yaml").read_text()
    assert "assets/tiny/llama" in saved and "vicuna" not in saved
    assert "lora_rank: 8" in saved and "batch_size_train: 2" in saved  # the user's settings are kept
    assert load(tmp_path / "run_dryrun" / "checkpoint_step1.pth")["step"] == 1

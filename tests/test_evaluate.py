"""Batched decoding, submission files and task scoring (evaluate.py)."""

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import evaluate
import inference
from humdial.scoring import HumDialScorer
from dataset_v1 import build_dataset, collate
from inference import decode, load_inference_config, load_model

REPO = Path(__file__).resolve().parent.parent
PARITY = REPO / "tests" / "parity"


def parity_config(tmp_path: Path) -> Path:
    """The parity fixtures' tiny SALMONN (trained tensors from its checkpoint): unlike the random-init demo
    model, its answers depend on the audio and the prompt, so a batch that mixed samples up would show."""
    meta = json.loads((PARITY / "meta.json").read_text())
    model = dict(meta["model_cfg"])
    model.update(llama_path=str(PARITY / "llama_dir"), whisper_path=str(PARITY / "whisper_dir"),
                 beats_path=str(PARITY / "beats.pt"), ckpt=str(PARITY / "salmonn_tiny.pth"),
                 prompt_path="", test_prompt_path=str(PARITY / "prompts/test_prompt_tiny.json"),
                 qformer_hidden_size=48, qformer_num_layers=2, qformer_num_heads=4, qformer_intermediate_size=96,
                 torch_dtype="float32")
    rng = np.random.default_rng(0)
    wavs = [PARITY / "clip0_5.1s.wav"]
    for seconds, rate in [(2.0, 16000), (0.6, 16000), (3.5, 22050)]:  # 22.05 kHz: resampled by load_audio
        wavs.append(tmp_path / f"noise_{seconds}s.wav")
        sf.write(wavs[-1], rng.normal(0, 0.1, int(seconds * rate)).astype(np.float32), rate)
    tasks = ["emotion_recognition", "QA", "audiocaption", "QA"]  # prompts of different lengths: left padding
    ann = [{"id": f"clip{i}", "path": str(w), "task": t, "text": "a calm speaker talks", "Q": "What is said?"}
           for i, (w, t) in enumerate(zip(wavs, tasks))]
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": ann}))
    cfg = {"model": model, "datasets": {"test_ann_path": str(tmp_path / "ann.json")},
           "run": {"num_workers": 0, "batch_size_eval": 4, "output_dir": str(tmp_path / "run")},
           "generate": {"num_beams": 1, "max_new_tokens": 8}}
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "parity.yaml")
    return tmp_path / "parity.yaml"


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_inference_config([str(parity_config(tmp_path_factory.mktemp("parity")))], [])
    dataset = build_dataset(cfg.datasets.test_ann_path, cfg.datasets, "test", cfg.model)
    return cfg, load_model(cfg, torch.device("cpu")), dataset


def test_batch_of_four_decodes_like_four_single_decodes(parity):
    cfg, model, dataset = parity
    settings = {"num_beams": 1, "max_new_tokens": 6}
    scorer = HumDialScorer()
    batched = list(decode(model, DataLoader(dataset, batch_size=4, collate_fn=collate), settings, None, scorer))
    alone = list(decode(model, DataLoader(dataset, batch_size=1, collate_fn=collate), settings, None, scorer))
    assert [r["id"] for r in batched] == ["clip0", "clip1", "clip2", "clip3"]
    assert [r["prediction"] for r in batched] == [r["prediction"] for r in alone]
    assert len({r["prediction"] for r in batched}) > 1, "answers should depend on the input"


def test_evaluate_main_on_the_demo_corpus(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "eval"
    rc = evaluate.main(["--ann", "data/demo/ann/test.json", "--out-dir", str(out), "--limit", "4",
                        "--batch-size", "2", "--num-workers", "0", "--num-beams", "1", "--max-new-tokens", "6",
                        "--device", "cpu"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4
    assert {"id", "task", "language", "prompt", "prediction", "reference", "emotions"} <= set(records[0])
    assert all(r["emotions"] for r in records)
    csv_path = out / "submission_emotional_trajectory.csv"
    assert list(csv.reader(csv_path.open()))[0] == ["testset_id", "text"]
    assert [row[0] for row in list(csv.reader(csv_path.open()))[1:]] == [r["id"] for r in records]
    scores = json.loads((out / "scores.json").read_text())["scores"]
    languages = {r["language"] for r in records}
    assert {f"emotional_trajectory/{lang}/emotion_turn_acc" for lang in languages} <= set(scores)
    captured = capsys.readouterr()
    assert "emotion_exact" in captured.out and "bleu" in captured.out and "rouge_l" in captured.out
    # Traceable: the checkpoint (the demo's), the config and the code are recorded.
    written = json.loads((out / "scores.json").read_text())
    sha256 = hashlib.sha256((REPO / "assets/tiny/salmonn_tiny.pth").read_bytes()).hexdigest()
    assert written["checkpoint"]["sha256"] == sha256 and written["config"]["model"]["ckpt"].endswith("salmonn_tiny.pth")
    assert written["code_version"] and all(r["checkpoint_sha256"] == sha256 for r in records)
    assert all(len(r["emotions_read"]) == len(r["emotions"]) for r in records)


def test_decoding_without_a_checkpoint_is_said_loudly(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_inference_config(None, ["model.ckpt="])
    load_model(cfg, torch.device("cpu"))
    assert "warning: model.ckpt is empty: answering with an untrained SALMONN" in capsys.readouterr().err


def test_evaluate_without_weights_names_what_to_download(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = evaluate.main(["--cfg-path", "configs/config.yaml", "--ann", "data/demo/ann/test.json",
                        "--out-dir", "/nonexistent/never/written"])
    assert rc == 2
    assert "checkpoints/whisper-large-v2" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- submissions
def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_written_submission_is_valid_and_one_line_per_answer(tmp_path):
    records = [{"id": "d1", "task": "empathy", "prediction": "I hear you,\nthat sounds hard."},
               {"id": "d2", "task": "empathy", "prediction": "你好，朋友"},
               {"id": "d1", "task": "emotional_trajectory", "prediction": "sad, then happy"}]
    paths = inference.write_submissions(records, tmp_path)
    assert [p.name for p in paths] == ["submission_emotional_trajectory.csv", "submission_empathy.csv"]
    rows = list(csv.reader((tmp_path / "submission_empathy.csv").open(encoding="utf-8")))
    assert rows == [["testset_id", "text"], ["d1", "I hear you, that sounds hard."], ["d2", "你好，朋友"]]
    assert inference.validate_submission(tmp_path / "submission_empathy.csv", {"d1", "d2"}) == []


def test_validator_catches_bad_rows(tmp_path):
    path = write_csv(tmp_path / "bad.csv", [
        ["id", "text"],              # wrong header
        ["d1", "fine"],
        ["d1", "again"],             # duplicate id
        ["d2", "a", "b"],            # three columns (an unquoted comma): d2 counts as missing, like d5
        ["", "no id"],
        ["d3", "   "],               # empty answer
        ["d4", "two\nlines"],
        ["x9", "unknown id"],
    ])
    problems = inference.validate_submission(path, expected_ids={"d1", "d2", "d3", "d4", "d5"})
    text = "\n".join(problems)
    assert "header is 'id,text'" in text
    assert "bad.csv:3: duplicate testset_id 'd1'" in text
    assert "bad.csv:4: 3 columns" in text
    assert "bad.csv:5: empty testset_id" in text
    assert "bad.csv:6: empty answer for 'd3'" in text
    assert "spans several lines" in text
    assert "2 test id(s) have no row, e.g. d2, d5" in text
    assert "1 id(s) are not in the test set, e.g. x9" in text
    assert len(problems) == 8


def test_validator_cli_exit_code(tmp_path, capsys):
    good = write_csv(tmp_path / "good.csv", [["testset_id", "text"], ["d1", "hello, world"]])
    assert evaluate.main(["--validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out
    assert evaluate.main(["--validate", str(tmp_path / "missing.csv")]) == 1
    assert "file not found" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- scoring
def test_score_predictions_picks_metrics_per_task_and_language():
    records = [
        {"task": "asr", "language": "en", "reference": "a b c", "prediction": "a x c"},
        {"task": "asr", "language": "zh", "reference": "今天天气好", "prediction": "今天天汽好"},
        {"task": "emotional_trajectory", "language": "en", "reference": "You started sad, then happy.",
         "prediction": "You started sad, then angry.", "emotions": ["sad", "happy"]},
        {"task": "empathy", "reference": "我明白你的感受", "prediction": "我明白你的感受"},  # language from text
    ]
    scores = HumDialScorer().score(records)
    assert scores["asr/en/wer"] == pytest.approx(100 / 3)
    assert scores["asr/zh/cer"] == pytest.approx(20.0)
    assert scores["emotional_trajectory/en/emotion_exact"] == 0.0
    assert scores["emotional_trajectory/en/emotion_turn_acc"] == pytest.approx(50.0)
    assert scores["empathy/zh/bleu"] == pytest.approx(100.0)
    assert scores["empathy/zh/rouge_l"] == pytest.approx(100.0)
    assert "asr/en/bleu" not in scores


def test_blind_test_set_gets_only_the_reference_free_language_match():
    assert HumDialScorer().score([{"task": "empathy", "language": "en", "reference": "",
                                   "prediction": "I see."}]) == {"empathy/en/language_match": 100.0}


def test_trajectory_with_unlabelled_turns_is_an_error():
    records = [{"task": "emotional_trajectory", "language": "en", "reference": "sad", "prediction": "sad",
                "emotions": ["sad", ""]}]
    with pytest.raises(ValueError, match="lack gold per-turn emotion labels"):
        HumDialScorer().score(records)


# ---------------------------------------------------------------------------------------------- nothing lost
DEMO_DECODE = ["--ann", "data/demo/ann/test.json", "--limit", "4", "--batch-size", "2", "--num-workers", "0",
               "--num-beams", "1", "--max-new-tokens", "5", "--device", "cpu"]


def test_unreadable_audio_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    ann = json.loads((REPO / "data/demo/ann/test.json").read_text())["annotation"][:2]
    (tmp_path / "notes.wav").write_text("not audio")
    entry = {**ann[1], "turns": [{**ann[1]["turns"][0], "path": "notes.wav"}, *ann[1]["turns"][1:]]}
    ann = [{**ann[0], "turns": [{**t, "path": str(REPO / "data/demo/ann" / t["path"])} for t in ann[0]["turns"]]},
           {**entry, "turns": [entry["turns"][0]] + [{**t, "path": str(REPO / "data/demo/ann" / t["path"])}
                                                       for t in entry["turns"][1:]]}]
    (tmp_path / "ann.json").write_text(json.dumps({"annotation": ann}))
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert evaluate.main(["--ann", str(tmp_path / "ann.json"), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: 1 unreadable clip(s): ")
    assert f"{entry['id']} (emotional_trajectory): cannot read audio file {tmp_path / 'notes.wav'}" in err


def test_a_killed_decode_continues_where_it_stopped(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert evaluate.main([*DEMO_DECODE, "--out-dir", str(tmp_path / "whole")]) == 0
    whole = (tmp_path / "whole" / "predictions.jsonl").read_text()

    from models.salmonn import SALMONN
    generate, calls = SALMONN.generate, {"n": 0}

    def dies_on_the_second_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(SALMONN, "generate", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main([*DEMO_DECODE, "--out-dir", str(tmp_path / "killed")])
    assert len((tmp_path / "killed" / "predictions.partial.jsonl").read_text().splitlines()) == 2  # batch 1 kept
    monkeypatch.setattr(SALMONN, "generate", generate)
    capsys.readouterr()
    assert evaluate.main([*DEMO_DECODE, "--out-dir", str(tmp_path / "killed")]) == 0
    assert "2 of 4 samples already done" in capsys.readouterr().out
    assert (tmp_path / "killed" / "predictions.jsonl").read_text() == whole


def test_a_folder_holding_another_decode_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert evaluate.main([*DEMO_DECODE, "--out-dir", str(tmp_path / "out")]) == 0
    before = (tmp_path / "out" / "predictions.jsonl").read_text()
    capsys.readouterr()
    assert evaluate.main([*DEMO_DECODE[:-4], "--max-new-tokens", "3", "--device", "cpu",
                          "--out-dir", str(tmp_path / "out")]) == 2
    assert "holds a decode made with another" in capsys.readouterr().err
    assert (tmp_path / "out" / "predictions.jsonl").read_text() == before


def test_a_worker_error_is_reported_by_its_own_message():
    from utils import error_message

    wrapped = ("Caught AudioError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise AudioError(...)\n'
               "dataset_v1.AudioError: d1 (empathy): cannot read audio file a.wav: Format not recognised.")
    assert error_message(ValueError(wrapped)) == "d1 (empathy): cannot read audio file a.wav: Format not recognised."
    assert error_message(ValueError("plain message")) == "plain message"

"""Nota's evaluator workflow (audiolm-evaluator): its annotation files (`testset_id`, relative paths under
datasets.prefix, blind sets without `text`), `evaluate.py --mode submission_*|valid_*`, and its `testXXXX` ids in
the submission validator. The annotations here are written from the format's key list, not copied."""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import evaluate
import metrics
from dataset_v1 import AnnotationError, build_dataset, read_annotation
from inference import validate_submission

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")
CLIPS = ("a.wav", "b.flac", "c.wav")


@pytest.fixture
def audio_root(tmp_path: Path) -> Path:
    """Three short noise clips under an audio root, as Nota's datasets.prefix points at one."""
    root = tmp_path / "audio_root"
    (root / "clips").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in CLIPS:
        sf.write(root / "clips" / name, rng.normal(0, 0.1, 20000).astype(np.float32), 16000)
    return root


def nota_file(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps({"annotation": entries}), encoding="utf-8")
    return path


def blind_entries(task: str = "asr") -> list[dict]:
    return [{"testset_id": f"test{i:04d}", "path": f"clips/{name}", "task": task} for i, name in enumerate(CLIPS)]


def test_nota_entries_read_with_testset_id_prefix_and_blind_text(tmp_path, audio_root):
    ann = nota_file(tmp_path / "test_asr.json", blind_entries())
    entries = read_annotation(ann, str(audio_root), blind_ok=True)
    assert [e["id"] for e in entries] == ["test0000", "test0001", "test0002"]
    assert [e["path"] for e in entries] == [str(audio_root / "clips" / n) for n in CLIPS]
    assert all(e["text"] == "" and e["ann_file"] == str(ann) for e in entries)
    with pytest.raises(AnnotationError, match=r"test_asr.json: annotation\[0\]: missing key 'text'"):
        read_annotation(ann, str(audio_root))  # training or validation data must have targets
    with pytest.raises(AnnotationError, match="audio file not found"):
        read_annotation(ann, blind_ok=True)  # without the prefix the paths are the file's folder's


def test_absolute_paths_ignore_the_prefix_and_bad_ids_are_named(tmp_path, audio_root):
    absolute = [{"testset_id": "test0007", "path": str(audio_root / "clips" / "a.wav"), "text": "hi"}]
    assert read_annotation(nota_file(tmp_path / "abs.json", absolute), "/elsewhere")[0]["path"] == absolute[0]["path"]
    clash = [{**absolute[0], "id": "other"}]
    with pytest.raises(AnnotationError, match="id 'other' and testset_id 'test0007' differ"):
        read_annotation(nota_file(tmp_path / "clash.json", clash))
    with pytest.raises(AnnotationError, match="testset_id must be a non-empty string"):
        read_annotation(nota_file(tmp_path / "num.json", [{**absolute[0], "testset_id": 7}]))
    with pytest.raises(AnnotationError, match=r"annotation\[0\]: an audio path must be a non-empty string"):
        read_annotation(nota_file(tmp_path / "nopath.json", [{"path": None, "text": "x"}]))


def test_entries_without_task_are_asr_and_counted(tmp_path, audio_root, caplog):
    entries = [{"path": "clips/a.wav", "text": "one"}, {"path": "clips/b.flac", "text": "two", "task": "QA",
                                                        "Q": "what?"}]
    with caplog.at_level(logging.INFO, logger="dataset_v1"):
        read = read_annotation(nota_file(tmp_path / "orig.json", entries), str(audio_root))
    assert [e["task"] for e in read] == ["asr", "QA"]
    assert "1 of 2 entries have no `task`: read as asr" in caplog.text


def test_a_list_of_annotation_files_is_one_split(tmp_path, audio_root):
    first = nota_file(tmp_path / "one.json", [{"path": "clips/a.wav", "text": "one"}])
    second = nota_file(tmp_path / "two.json", [{"path": "clips/b.flac", "text": "two"},
                                               {"path": "clips/c.wav", "text": "three"}])
    dataset = build_dataset([str(first), str(second)], {"prefix": str(audio_root)}, "train",
                            {"whisper_path": str(ROOT / "assets/tiny/whisper_5s"),
                             "llm_path": str(ROOT / "assets/tiny/llama"),
                             "prompt_path": str(ROOT / "prompts/train_prompt.json")})
    assert [e["text"] for e in dataset.annotation] == ["one", "two", "three"]
    assert [e["ann_file"] for e in dataset.annotation] == [str(first), str(second), str(second)]
    assert dataset[2]["target"] == "three" and dataset[2]["spectrogram"].shape[0] == 1


def write_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("testset_id", "text"), *rows])
    return path


def test_validator_checks_nota_ids_only_when_they_are_nota_style(tmp_path):
    good = write_csv(tmp_path / "good.csv", [("test0000", "a"), ("test0001", "b")])
    assert validate_submission(good, {"test0000", "test0001"}) == []
    bad = write_csv(tmp_path / "bad.csv", [("test0000", "a"), ("test01", "b"), ("clip_3", "c")])
    [problem] = validate_submission(bad)
    assert "2 testset_id(s) are not in Nota's format testXXXX" in problem and "'test01', 'clip_3'" in problem
    assert validate_submission(write_csv(tmp_path / "humdial.csv", [("zh_0102_0001", "a")])) == []


def test_validate_with_nota_ann_needs_no_audio(tmp_path, capsys):
    ann = nota_file(tmp_path / "test_asr.json", blind_entries())  # no audio anywhere: ids are all that matter
    ok = write_csv(tmp_path / "ok.csv", [("test0000", "a"), ("test0001", "b"), ("test0002", "c")])
    assert evaluate.main(["--validate", str(ok), "--ann", str(ann)]) == 0
    short = write_csv(tmp_path / "short.csv", [("test0000", "a")])
    assert evaluate.main(["--validate", str(short), "--ann", str(ann)]) == 1
    assert "2 test id(s) have no row, e.g. test0001, test0002" in capsys.readouterr().out


def decode(ann: Path, audio_root: Path, out_dir: Path, *mode: str) -> int:
    """evaluate.py on the tiny demo model, Nota style: the audio root as datasets.prefix."""
    return evaluate.main(["--cfg-path", DEMO, "--options", f"datasets.prefix={audio_root}", "--ann", str(ann),
                          "--out-dir", str(out_dir), "--batch-size", "3", "--num-workers", "0",
                          "--max-new-tokens", "4", *mode])


def test_submission_mode_writes_a_csv_keyed_by_testset_id_that_validates(tmp_path, audio_root, capsys):
    ann = nota_file(tmp_path / "test_asr.json", blind_entries() + [
        {"testset_id": "test0100", "path": "clips/a.wav", "task": "audiocaption_v2", "text": "a caption"}])
    assert decode(ann, audio_root, tmp_path / "out", "--mode", "submission_asr") == 0
    csv_path = tmp_path / "out" / "submission_asr.csv"
    rows = list(csv.reader(csv_path.open(encoding="utf-8")))
    assert [row[0] for row in rows] == ["testset_id", "test0000", "test0001", "test0002"]  # the asr entries only
    assert not list((tmp_path / "out").glob("submission_audiocaption*"))
    assert evaluate.main(["--validate", str(csv_path), "--ann", str(ann), "--task", "asr"]) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())["scores"]
    assert set(scores) == {"asr/en/language_match"}  # nothing scored: a blind set
    capsys.readouterr()


def test_valid_modes_need_text_and_submission_modes_need_their_task(tmp_path, audio_root, capsys):
    ann = nota_file(tmp_path / "test_asr.json", blind_entries())
    assert decode(ann, audio_root, tmp_path / "v", "--mode", "valid_asr") == 2
    assert "--mode valid_asr scores against `text`, which this entry lacks" in capsys.readouterr().err
    assert decode(ann, audio_root, tmp_path / "s", "--mode", "submission_aac") == 2
    assert "decodes the audiocaption/audiocaption_v2 entries; this annotation has none (its tasks: asr)" in \
        capsys.readouterr().err


def test_a_file_with_references_gets_wer_and_cider_d(tmp_path, audio_root, monkeypatch, capsys):
    """valid_* modes score; without --mode every task is scored (METEOR, the slow one, is checked in
    test_caption_metrics.py and left out here)."""
    machine = metrics.caption_machine_gaps()
    monkeypatch.setattr(metrics, "caption_machine_gaps", lambda: {**machine, "meteor": "left out in this test"})
    entries = [{"testset_id": f"test{i:04d}", "path": f"clips/{name}", "task": task, "text": text}
               for i, (name, task, text) in enumerate([("a.wav", "asr", "hello there"), ("b.flac", "asr", "good day"),
                                                       ("a.wav", "audiocaption_v2", "a man speaks"),
                                                       ("c.wav", "audiocaption_v2", "static noise hisses")])]
    ann = nota_file(tmp_path / "valid.json", entries)
    assert decode(ann, audio_root, tmp_path / "aac", "--mode", "valid_aac") == 0
    out = capsys.readouterr().out
    aac = json.loads((tmp_path / "aac" / "scores.json").read_text())["scores"]
    assert "audiocaption_v2/en/meteor: unavailable: left out in this test" in out
    if metrics._toolkit() is not None and metrics.shutil.which("java"):
        assert "audiocaption_v2/en/cider_d" in aac and "audiocaption_v2/en/spider" not in aac
        if "spice" in machine:
            assert "audiocaption_v2/en/spider: unavailable: SPICE needs Stanford CoreNLP 3.6.0" in out
    assert not any(key.startswith("asr/") for key in aac)
    assert decode(ann, audio_root, tmp_path / "asr", "--mode", "valid_asr") == 0
    asr = json.loads((tmp_path / "asr" / "scores.json").read_text())["scores"]
    assert set(asr) == {"asr/en/wer", "asr/en/language_match"}
    records = [json.loads(line) for line in (tmp_path / "asr" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["reference"]) for r in records] == [("test0000", "hello there"), ("test0001", "good day")]
    assert asr["asr/en/wer"] == pytest.approx(metrics.wer([r["reference"] for r in records],
                                                          [r["prediction"] for r in records]))

"""The pieces of the listening experiment (scripts/learning_experiment.py), without running it."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dataset_v1 import build_dataset, collate, log_mel
from humdial.trajectory import emotion_trajectory_scores
from metrics import extract_emotions

from scripts import learning_experiment as exp

ANN = Path("data/demo/ann")


def demo_dataset(silence: bool):
    cfg = OmegaConf.load("configs/demo_learning.yaml")
    return build_dataset(str(ANN / "train.json"), {**cfg.datasets, "silence_audio": silence}, "test", cfg.model)


def test_silencing_zeroes_the_audio_and_keeps_everything_else():
    heard, silenced = demo_dataset(False), demo_dataset(True)
    a, b = collate([heard[0], heard[1]]), collate([silenced[0], silenced[1]])
    assert a["raw_wav"].abs().sum() > 0 and bool((b["raw_wav"] == 0).all())
    assert torch.equal(a["padding_mask"], b["padding_mask"])  # same lengths, so the same number of speech tokens
    assert a["prompt"] == b["prompt"] and a["target"] == b["target"] and a["speech_slots"] == b["speech_slots"]
    lengths = (~b["padding_mask"]).sum(-1).tolist()
    zeros = log_mel([np.zeros(n, dtype=np.float32) for n in lengths], silenced.feature_extractor)
    assert torch.equal(b["spectrogram"], torch.from_numpy(zeros))
    assert not torch.equal(a["spectrogram"], b["spectrogram"])


def test_held_out_split_shares_no_dialogue_with_training():
    train = exp.dialogues(ANN / "train.json") + exp.dialogues(ANN / "valid.json")
    test = exp.dialogues(ANN / "test.json")
    exp.check_held_out(train, test)
    assert {e["id"] for e in train}.isdisjoint({e["id"] for e in test})
    with pytest.raises(ValueError, match="also training dialogues"):
        exp.check_held_out(train, test + train[:1])


def reads_back(answer: str, emotions: list[str]) -> bool:
    """The trajectory metric reads every scored turn's label back from the answer."""
    return emotion_trajectory_scores([emotions], [answer]).exact_match == 100.0


def _dialogue(id_: str, emotions: list[str], language: str = "en") -> dict:
    return {"id": id_, "language": language, "turns": [{"emotion": e} for e in emotions]}


def test_scores_cover_exactly_the_held_out_dialogues(tmp_path):
    test = [_dialogue("t1", ["sad", "happy"]), _dialogue("t2", ["anger", "fear", "neutral"])]
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"id": "t1", "prediction": "You started sad, then ended up happy."},
            {"id": "t2", "prediction": "You started angry, then calm."}]
    predictions.write_text("\n".join(json.dumps(r) for r in rows))
    scores = exp.score(predictions, test)
    # t1: 2/2; t2: angry right, calm != fear (its final neutral question turn is not scored: trajectory.scored_turns)
    assert scores["turn_accuracy"] == pytest.approx(100 * 3 / 4)
    assert scores["exact_match"] == pytest.approx(50.0)
    assert scores["language_match"] == pytest.approx(100.0)  # both answers are English, as their dialogues

    predictions.write_text("\n".join(json.dumps(r) for r in rows + [{"id": "train_9", "prediction": "sad"}]))
    with pytest.raises(ValueError, match="do not cover the held-out set exactly"):
        exp.score(predictions, test)
    predictions.write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="missing \\['t2'\\]"):
        exp.score(predictions, test)


def test_chance_levels():
    train = [_dialogue("a", ["sad", "sad", "happy"])]
    test = [_dialogue("b", ["sad", "anger"]), _dialogue("c", ["fear", "sad"])]
    chance = exp.chance_levels(train, test)
    assert chance["uniform"] == pytest.approx(100 / 7)
    assert chance["majority"] == pytest.approx(50.0)  # "sad" is right on 2 of 4 test turns


def test_turn_samples_name_each_turns_emotion_with_the_trajectory_word():
    train = exp.dialogues(ANN / "train.json")
    turns = exp.turn_samples(train)
    assert len(turns) == sum(len(e["turns"]) for e in train) > 0
    assert [t["path"] for t in turns] == [t["path"] for e in train for t in e["turns"]]  # no held-out audio
    for sample, turn in zip(turns, (t for e in train for t in e["turns"])):
        assert sample["task"] == "emotion_recognition"
        assert extract_emotions(sample["text"]) == [turn["emotion"]]  # the word the trajectory answers use


def test_sub_dialogues_are_every_inner_run_of_consecutive_turns():
    train = exp.dialogues(ANN / "train.json")
    subs = exp.sub_dialogues(train)
    # A dialogue of n turns has n - L + 1 runs of L turns; L = 2 .. n - 1 sums to n (n - 1) / 2 - 1.
    assert len(subs) == sum(len(e["turns"]) * (len(e["turns"]) - 1) // 2 - 1 for e in train) > 0
    by_id = {e["id"]: e for e in train}
    for sub in subs:
        parent = by_id[sub["id"].rsplit("_turns", 1)[0]]
        first, last = map(int, sub["id"].rsplit("_turns", 1)[1].split("-"))
        assert 2 <= len(sub["turns"]) < len(parent["turns"])
        assert sub["turns"] == parent["turns"][first - 1:last]
        assert reads_back(sub["text"], [t["emotion"] for t in sub["turns"]]), sub["text"]
        assert sub["language"] == parent["language"] and sub["task"] == parent["task"]
    assert len({s["id"] for s in subs}) == len(subs)


def test_recombined_dialogues_use_one_training_speakers_turns_and_name_their_emotions():
    train = exp.dialogues(ANN / "train.json")
    made = exp.recombined_dialogues(train, count=50, seed=3)
    assert len(made) == 50 and len({e["id"] for e in made}) == 50
    assert made == exp.recombined_dialogues(train, count=50, seed=3)  # reproducible
    questions = {e["turns"][-1]["path"] for e in train}
    source = {t["path"]: d["id"] for d in train for t in d["turns"]}
    assert sum(len({source[t["path"]] for t in e["turns"]}) > 1 for e in made) > 25  # turns of several dialogues
    for e in made:
        speaker_turns = {t["path"] for d in train if exp.speaker_of(d["id"]) == exp.speaker_of(e["id"])
                         for t in d["turns"]}
        paths = [t["path"] for t in e["turns"]]
        assert 3 <= len(paths) <= 5 and len(set(paths)) == len(paths)
        assert set(paths) <= speaker_turns  # one speaker, training audio only
        assert paths[-1] in questions and not set(paths[:-1]) & questions  # statements, then a closing question
        assert reads_back(e["text"], [t["emotion"] for t in e["turns"]]), e["text"]
    sequences = {tuple(t["emotion"] for t in e["turns"]) for e in made}
    assert len(sequences - {tuple(t["emotion"] for t in e["turns"]) for e in train}) > 25  # most: new sequences


def test_turn_recognition_accuracy_reads_the_first_emotion_word(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    rows = [{"prediction": "sad", "reference": "sad"}, {"prediction": "Happy, then sad.", "reference": "sad"},
            {"prediction": "...", "reference": "fear"}, {"prediction": "生气", "reference": "anger"}]
    predictions.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    assert exp.turn_recognition_accuracy(predictions) == pytest.approx(50.0)


def test_run_together_times_each_command_and_names_the_failed_one(tmp_path):
    logs = {name: tmp_path / f"{name}.log" for name in ("quick", "slow")}
    seconds = exp.run_together({"slow": [sys.executable, "-c", "import time; time.sleep(2)"],
                                "quick": [sys.executable, "-c", "print('hi')"]}, logs)
    assert seconds["quick"] < seconds["slow"] - 1.0  # the quick one is not charged the slow one's time
    assert logs["quick"].read_text().strip() == "hi"
    with pytest.raises(RuntimeError, match=r"bad failed:[\s\S]*boom"):
        exp.run_together({"bad": [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"],
                          "good": [sys.executable, "-c", "pass"]}, {"bad": logs["slow"], "good": logs["quick"]})


def test_report_plot_is_written(tmp_path):
    rows = {"audio": {"turn_accuracy": 60.0, "exact_match": 20.0, "turn_recognition": 80.0},
            "audio silenced": {"turn_accuracy": 20.0, "exact_match": 1.0, "turn_recognition": 22.0}}
    exp.plot(rows, {"uniform": 100 / 7, "majority": 15.0}, tmp_path / "report.png")
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_turn_chance_counts_the_neutral_questions():
    train = [_dialogue("a", ["sad", "neutral"]), _dialogue("b", ["happy", "neutral"])]
    test = [_dialogue("c", ["sad", "happy", "neutral"])]
    chance = exp.chance_levels(train, test)
    assert chance["turn_majority"] == pytest.approx(100 / 3)  # neutral, every closing question
    assert chance["majority"] == pytest.approx(50.0)  # scored turns only: sad (first of the tied labels)


def test_a_finished_run_is_not_trained_again_and_keeps_its_training_time(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert exp.finished_training_seconds(run) is None  # never started
    log = run / "train.log"
    log.write_text("2026-12-02 03:31:42 INFO salmonn.train: config x resolved:\n"
                   "train:  46%|  1115/2400 [20:28<13:47]\n")
    assert exp.finished_training_seconds(run) is None  # killed or still running
    log.write_text(log.read_text() + "2026-12-02 04:15:02 INFO salmonn.train: done: 2400 steps, best {}, 0 skipped\n")
    assert exp.finished_training_seconds(run) == 43 * 60 + 20


def test_accuracy_by_position_scores_each_turn_position_apart():
    gold = [["sad", "happy", "neutral"], ["anger", "fear", "sad", "neutral"]]
    answers = ["sad, then happy.", "angry, then sad, then sad."]  # 2nd dialogue: fear missed at position 2
    assert exp.accuracy_by_position(gold, answers) == pytest.approx([100.0, 50.0, 100.0])
    # the score's own per-turn accuracy is the turn-weighted mean of the positions
    assert emotion_trajectory_scores(gold, answers).turn_accuracy == pytest.approx(100 * 4 / 5)


def test_seed_summary_gives_mean_and_range_per_mode():
    rows = {f"{mode} seed {seed}": {"turn_accuracy": acc, "exact_match": acc / 2, "turn_recognition": 80.0}
            for mode, seed, acc in [("b", 42, 74.0), ("b", 0, 78.0), ("c", 42, 52.0), ("c", 0, 66.0), ("c", 1, 70.0)]}
    summary = exp.seed_summary(rows, {name: name.split(" seed ")[0] for name in rows})
    assert summary["b"]["turn_accuracy"] == pytest.approx([76.0, 74.0, 78.0]) and summary["b"]["seeds"] == 2
    assert summary["c"]["exact_match"] == pytest.approx([31.333333, 26.0, 35.0]) and summary["c"]["seeds"] == 3
    assert "| c | 3 | 62.7 % (52.0-70.0) |" in exp.summary_table(summary)

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import convert
from convert import EMOTIONS, DataError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo"


def write_tone(path: Path, seconds: float = 0.25, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 440 * t), rate)


def dialogue(root: Path, dialogue_id: str, emotions=("neutral", "sad", "anger"), reply_key="response_text",
             make_audio=True) -> dict:
    """A HumDial-shaped record whose audio files exist under root (unless make_audio is False)."""
    turns = []
    for n, emotion in enumerate(emotions, start=1):
        audio = f"task1_{len(emotions)}/{dialogue_id}_{n}.wav"
        if make_audio:
            write_tone(root / audio)
        turns.append({"turn_id": n, "text": f"user words {n}", "emotion": emotion, "split_audio_file": audio,
                      reply_key: f"reply {n}", "response_audio": ""})
    return {"dialogue_id": dialogue_id, "turns": turns}


def write_jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def annotation(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["annotation"]


def outputs(out: Path) -> list[str]:
    return sorted(os.listdir(out)) if out.exists() else []


def test_converts_a_dialogue_keeping_what_models_and_metrics_need(tmp_path, capsys):
    src = write_jsonl(tmp_path / "HD-Track1-T1.jsonl", [dialogue(tmp_path, "zh_0102_0001"),
                                                         dialogue(tmp_path, "en_0001_0002", ("happy",) * 4)])
    out = tmp_path / "out"
    assert convert.main([str(src), "-o", str(out)]) == 0
    entries = annotation(out / "train.json")
    first = entries[0]
    assert first["id"] == "zh_0102_0001" and first["task"] == "emotional_trajectory"
    assert first["language"] == "zh" and entries[1]["language"] == "en"
    assert first["Q"] == "user words 3" and first["text"] == "reply 3"
    assert [t["emotion"] for t in first["turns"]] == ["neutral", "sad", "anger"]
    assert [t["transcript"] for t in first["turns"]] == ["user words 1", "user words 2", "user words 3"]
    assert [t.get("reply") for t in first["turns"]] == ["reply 1", "reply 2", None]  # the target is not history
    for turn in first["turns"]:
        assert (out / turn["path"]).resolve() == (tmp_path / f"task1_3/zh_0102_0001_{turn['path'][-5]}.wav")
        assert turn["duration"] == pytest.approx(0.25)
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "dialogues=2" in summary and "turns=7" in summary and "hours=0.000" in summary
    assert "'en': 1" in summary and "'zh': 1" in summary and "'happy': 4" in summary
    assert not (out / "valid.json").exists()
    assert json.loads((out / "train_report.json").read_text())["labels"]["happy"] == 4


def test_response_txt_is_accepted(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1", reply_key="response_txt")])
    convert.convert([src], tmp_path / "out")
    entry = annotation(tmp_path / "out" / "train.json")[0]
    assert entry["text"] == "reply 3" and entry["turns"][0]["reply"] == "reply 1"


def test_malformed_json_names_file_and_line_and_writes_nothing(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1"), '{"dialogue_id": "en_2", "turns": ['])
    out = tmp_path / "out"
    assert convert.main([str(src), "-o", str(out)]) == 1
    assert f"{src}:2: malformed JSON" in capsys.readouterr().err
    assert outputs(out) == []


def test_missing_audio_names_dialogue_turn_and_path(tmp_path):
    record = dialogue(tmp_path, "en_7")
    (tmp_path / record["turns"][1]["split_audio_file"]).unlink()
    src = write_jsonl(tmp_path / "t1.jsonl", [record])
    with pytest.raises(DataError, match=r"t1\.jsonl:1: dialogue en_7, turn 2: audio file not found: .*en_7_2\.wav"):
        convert.convert([src], tmp_path / "out")
    assert outputs(tmp_path / "out") == []


def test_unknown_emotion_label_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1", ("neutral", "bored", "sad"))])
    with pytest.raises(DataError, match=r"dialogue en_1, turn 2: field 'emotion': unknown label 'bored'"):
        convert.convert([src], tmp_path / "out")


def test_label_aliases_are_mapped_and_reported(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1", ("Angry", "surprised", "happiness",
                                                                          "angry"))])
    out = tmp_path / "out"
    assert convert.main([str(src), "-o", str(out)]) == 0
    assert [t["emotion"] for t in annotation(out / "train.json")[0]["turns"]] == ["anger", "surprise", "happy",
                                                                                   "anger"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["label_aliases"] == {"Angry -> anger": 1, "surprised -> surprise": 1,
                                       "happiness -> happy": 1, "angry -> anger": 1}
    assert "label alias: surprised -> surprise (1x)" in capsys.readouterr().out


def test_empty_turns_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", [{"dialogue_id": "en_1", "turns": []}])
    with pytest.raises(DataError, match=r"t1\.jsonl:1: dialogue en_1: 'turns' is empty"):
        convert.convert([src], tmp_path / "out")


@pytest.mark.parametrize("key", ["text", "emotion", "split_audio_file", "response_text"])
def test_missing_turn_field_names_dialogue_turn_and_key(tmp_path, key):
    record = dialogue(tmp_path, "en_1")
    del record["turns"][2][key]
    src = write_jsonl(tmp_path / "t1.jsonl", [record])
    with pytest.raises(DataError, match=rf"dialogue en_1, turn 3: missing field '{key}'"):
        convert.convert([src], tmp_path / "out")


@pytest.mark.parametrize("key", ["dialogue_id", "turns"])
def test_missing_dialogue_field_is_an_error(tmp_path, key):
    record = dialogue(tmp_path, "en_1")
    del record[key]
    src = write_jsonl(tmp_path / "t1.jsonl", [record])
    with pytest.raises(DataError, match=rf"t1\.jsonl:1.*missing field '{key}'"):
        convert.convert([src], tmp_path / "out")


def test_wrong_field_type_and_turn_order_are_errors(tmp_path):
    record = dialogue(tmp_path, "en_1")
    record["turns"][0]["text"] = 5
    with pytest.raises(DataError, match=r"turn 1: field 'text' must be str"):
        convert.convert([write_jsonl(tmp_path / "t1.jsonl", [record])], tmp_path / "out")
    record = dialogue(tmp_path, "en_2")
    record["turns"].reverse()
    with pytest.raises(DataError, match=r"turn_id values are not increasing: \[3, 2, 1\]"):
        convert.convert([write_jsonl(tmp_path / "t1.jsonl", [record])], tmp_path / "out")


def test_duplicate_dialogue_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1"), dialogue(tmp_path, "en_1")])
    with pytest.raises(DataError, match="dialogue en_1 task emotional_trajectory already given"):
        convert.convert([src], tmp_path / "out")


def test_skip_invalid_counts_each_reason_and_writes_a_report(tmp_path, capsys):
    missing_audio = dialogue(tmp_path, "en_3")
    (tmp_path / missing_audio["turns"][0]["split_audio_file"]).unlink()
    missing_field = dialogue(tmp_path, "en_5")
    del missing_field["turns"][0]["emotion"]
    records = [dialogue(tmp_path, "en_1"), "{not json", missing_audio,
               dialogue(tmp_path, "en_4", ("neutral", "bored")), missing_field,
               {"dialogue_id": "en_6", "turns": []}, dialogue(tmp_path, "en_2", ("Angry", "sad", "fear"))]
    src = write_jsonl(tmp_path / "t1.jsonl", records)
    out = tmp_path / "out"
    assert convert.main([str(src), "-o", str(out), "--skip-invalid"]) == 0
    assert [e["id"] for e in annotation(out / "train.json")] == ["en_1", "en_2"]
    report = json.loads((out / "train_report.json").read_text())
    assert report["skipped"] == {"malformed_json": 1, "missing_audio": 1, "unknown_emotion": 1,
                                 "missing_field": 1, "empty_turns": 1}
    assert len(report["skipped_records"]) == 5 and f"{src}:2" in report["skipped_records"][0]["error"]
    assert report["label_aliases"] == {"Angry -> anger": 1}  # not counted for the skipped dialogues
    stdout = capsys.readouterr().out
    assert "skipped 1 record(s): missing_audio" in stdout and "dialogues=2" in stdout and "skipped=5" in stdout


def test_nothing_valid_is_an_error_even_when_skipping(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", ["{bad"])
    with pytest.raises(DataError, match="no valid entries"):
        convert.convert([src], tmp_path / "out", skip_invalid=True)


def make_split_inputs(tmp_path: Path, count: int = 12) -> list[Path]:
    """The same dialogues under two tasks (T1 and T2 files)."""
    records = [dialogue(tmp_path, f"en_{i:02d}") for i in range(count)]
    return [write_jsonl(tmp_path / "HD-Track1-T1.jsonl", records),
            write_jsonl(tmp_path / "HD-Track1-T2.jsonl", records)]


def test_split_is_by_dialogue_id_disjoint_and_seeded(tmp_path):
    inputs = make_split_inputs(tmp_path)

    def split(seed: int, name: str) -> tuple[list[dict], list[dict]]:
        out = tmp_path / name
        convert.convert(inputs, out, valid_ratio=0.25, seed=seed)
        return annotation(out / "train.json"), annotation(out / "valid.json")

    train, valid = split(0, "a")
    train_ids, valid_ids = {e["id"] for e in train}, {e["id"] for e in valid}
    assert len(valid_ids) == 3 and not train_ids & valid_ids and len(train_ids | valid_ids) == 12
    assert len(train) == 18 and len(valid) == 6  # both tasks of a dialogue stay on the same side
    assert {e["task"] for e in valid} == {"emotional_trajectory", "emotional_reasoning"}
    assert {e["id"] for e in split(0, "b")[1]} == valid_ids  # same seed, same split
    assert any({e["id"] for e in split(seed, f"s{seed}")[1]} != valid_ids for seed in (1, 2, 3))


def test_task_comes_from_option_field_or_file_name(tmp_path):
    record = dialogue(tmp_path, "en_1")
    unnamed = write_jsonl(tmp_path / "dialogues.jsonl", [record])
    with pytest.raises(DataError, match="task None unknown or not given; pass --task"):
        convert.convert([unnamed], tmp_path / "out")
    convert.convert([unnamed], tmp_path / "o1", task="empathy")
    assert annotation(tmp_path / "o1" / "train.json")[0]["task"] == "empathy"
    convert.convert([write_jsonl(tmp_path / "d2.jsonl", [{**record, "task": "emotional_reasoning"}])],
                    tmp_path / "o2")
    assert annotation(tmp_path / "o2" / "train.json")[0]["task"] == "emotional_reasoning"
    assert convert.task_from_name(Path("x/HD-Track1-T3.jsonl")) == "empathy"
    assert convert.task_from_name(Path("x/task2_train.jsonl")) == "emotional_reasoning"
    assert convert.task_from_name(Path("HD-Track1/dialogues.jsonl")) is None  # "Track1" is not a task


def test_audio_root_option(tmp_path):
    audio_root = tmp_path / "audio"
    record = dialogue(audio_root, "en_1")
    (tmp_path / "lists").mkdir()
    src = write_jsonl(tmp_path / "lists" / "T1.jsonl", [record])
    with pytest.raises(DataError, match="audio file not found"):
        convert.convert([src], tmp_path / "out")
    convert.convert([src], tmp_path / "out", audio_root=audio_root)
    turn = annotation(tmp_path / "out" / "train.json")[0]["turns"][0]
    assert (tmp_path / "out" / turn["path"]).resolve() == (audio_root / record["turns"][0]["split_audio_file"])


def test_original_salmonn_format_passes_through(tmp_path):
    write_tone(tmp_path / "clips" / "a.wav")
    write_tone(tmp_path / "clips" / "b.flac")
    entries = [{"path": "clips/a.wav", "text": "hello", "task": "asr"},
               {"path": "clips/b.flac", "text": "a dog", "task": "QA", "Q": "What do you hear?", "extra": 1}]
    src = tmp_path / "orig.json"
    src.write_text(json.dumps({"annotation": entries}))
    out = tmp_path / "out"
    convert.convert([src], out)
    converted = annotation(out / "train.json")
    assert [(e["text"], e["task"], e.get("Q")) for e in converted] == [("hello", "asr", None),
                                                                      ("a dog", "QA", "What do you hear?")]
    assert converted[1]["extra"] == 1
    assert (out / converted[1]["path"]).resolve() == tmp_path / "clips" / "b.flac"
    del entries[0]["task"]
    src.write_text(json.dumps({"annotation": entries}))
    with pytest.raises(DataError, match=r"orig\.json: annotation\[0\]: missing field 'task'"):
        convert.convert([src], tmp_path / "out2")


def test_error_keeps_earlier_outputs_and_leaves_no_temp_files(tmp_path):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_1")])
    out = tmp_path / "out"
    convert.convert([src], out)
    before = (out / "train.json").read_bytes()
    write_jsonl(src, [dialogue(tmp_path, "en_2"), "{broken"])
    with pytest.raises(DataError):
        convert.convert([src], out)
    assert (out / "train.json").read_bytes() == before
    assert outputs(out) == ["train.json", "train_report.json"]


# ------------------------------------------------------------------------------------------- the demo corpus
def test_demo_corpus_converts_and_has_the_promised_shape(tmp_path):
    out = tmp_path / "ann"
    stats = convert.convert([DEMO / "HD-Track1-T1-train.jsonl"], out, valid_ratio=0.15)
    test_stats = convert.convert([DEMO / "HD-Track1-T1-test.jsonl"], out, name="test")
    assert set(stats.labels) == set(EMOTIONS) and set(test_stats.labels) == set(EMOTIONS)
    assert set(stats.languages) == {"en", "zh"} and set(test_stats.languages) == {"en", "zh"}
    assert set(stats.turns_per_dialogue) == {3, 4, 5}
    entries = annotation(out / "train.json") + annotation(out / "valid.json")
    test_entries = annotation(out / "test.json")
    train_ids = {e["id"] for e in entries}
    assert not train_ids & {e["id"] for e in test_entries}
    train_sentences = {t["transcript"] for e in entries for t in e["turns"]}
    test_sentences = {t["transcript"] for e in test_entries for t in e["turns"][:-1]}
    assert test_sentences - train_sentences  # some held-out sentences never appear in training
    rates = {sf.info(str(out / t["path"])).samplerate for e in entries for t in e["turns"]}
    assert 16000 not in rates and len(rates) > 1
    # the shipped annotations are what convert.py makes of the shipped corpus (nothing stale)
    shipped = [e for e in annotation(DEMO / "ann" / "train.json") + annotation(DEMO / "ann" / "valid.json")
               if e["task"] == "emotional_trajectory"]
    assert sorted(e["id"] for e in shipped) == sorted(train_ids)


def test_demo_user_turns_carry_no_emotion_words_and_targets_read_back():
    from humdial.trajectory import emotion_trajectory_scores
    from metrics import extract_emotions
    targets = []
    for name in ("HD-Track1-T1-train.jsonl", "HD-Track1-T1-test.jsonl"):
        for line in (DEMO / name).read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for turn in record["turns"]:
                assert extract_emotions(turn["text"]) == [], turn["text"]
            for turn in record["turns"][:-1]:
                assert extract_emotions(turn["response_text"]) == [], turn["response_text"]
            assert record["turns"][-1]["emotion"] == "neutral"  # the closing question, as in the release
            target = record["turns"][-1]["response_text"]
            gold = [t["emotion"] for t in record["turns"]]
            assert emotion_trajectory_scores([gold], [target]).exact_match == 100.0, target
            targets.append(target)
    # Varied like real answers: no one template, synonyms rather than one word per label.
    openings = {t.split("，")[0][:4] if "，" in t else t.split(",")[0][:12] for t in targets}
    assert len(openings) >= 4 and len(set(targets)) == len(targets)


def test_demo_corpus_has_all_three_tasks_and_release_style_transcripts():
    entries = annotation(DEMO / "ann" / "train.json") + annotation(DEMO / "ann" / "test.json")
    tasks = {e["task"] for e in entries}
    assert tasks == {"emotional_trajectory", "emotional_reasoning", "empathy"}
    transcripts = [t["transcript"] for e in entries for t in e["turns"]]
    assert any(t.startswith(("[laughter]", "[sigh]", "[笑声]", "[叹息声]")) for t in transcripts)
    from scripts.make_demo_corpus import EMPATHY, REPLIES

    empathy = {reply.split("{}")[0] for replies in EMPATHY.values() for reply in replies.values()}
    for entry in (e for e in entries if e["task"] == "empathy"):  # ends at its evaluated turn: 2nd non-neutral
        assert [t["emotion"] != "neutral" for t in entry["turns"]].count(True) == 2
        assert entry["turns"][-1]["emotion"] != "neutral" and entry["text"] not in REPLIES[entry["language"]]
        assert any(entry["text"].startswith(opening) for opening in empathy), entry["text"]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_demo_corpus_generation_is_reproducible_for_any_number_of_threads(tmp_path):
    from scripts import make_demo_corpus

    make_demo_corpus.build(tmp_path / "one", num_dialogues=3, test_fraction=0.34, seed=5, workers=1)
    make_demo_corpus.build(tmp_path / "three", num_dialogues=3, test_fraction=0.34, seed=5, workers=3)
    for name in ("HD-Track1-T1-train.jsonl", "HD-Track1-T1-test.jsonl"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "three" / name).read_text()
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "audio").rglob("*.*"))
    assert files == sorted(p.relative_to(tmp_path / "three") for p in (tmp_path / "three" / "audio").rglob("*.*"))
    assert len(files) >= 9  # 3 dialogues of 3-5 turns, one file a turn
    for f in files:
        a, rate_a = sf.read(str(tmp_path / "one" / f))
        b, rate_b = sf.read(str(tmp_path / "three" / f))
        assert rate_a == rate_b and a.shape == b.shape and np.array_equal(a, b), f
        assert np.abs(a).max() > 0.01, f  # speech, not silence


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt-get install espeak-ng)")
def test_plain_audio_corpus_has_the_same_dialogues_in_16k_mono_wav(tmp_path):
    from scripts import make_demo_corpus

    make_demo_corpus.build(tmp_path / "mixed", num_dialogues=3, test_fraction=0.34, seed=5, workers=2)
    make_demo_corpus.build(tmp_path / "plain", num_dialogues=3, test_fraction=0.34, seed=5, workers=2,
                           plain_audio=True)
    for name in ("HD-Track1-T1-train.jsonl", "HD-Track1-T1-test.jsonl"):
        mixed = [json.loads(line) for line in (tmp_path / "mixed" / name).read_text().splitlines()]
        plain = [json.loads(line) for line in (tmp_path / "plain" / name).read_text().splitlines()]
        for m, p in zip(mixed, plain, strict=True):
            for tm, tp in zip(m["turns"], p["turns"], strict=True):
                assert tp["split_audio_file"] == tm["split_audio_file"].rsplit(".", 1)[0] + ".wav"
                assert {**tm, "split_audio_file": ""} == {**tp, "split_audio_file": ""}
                info = sf.info(str(tmp_path / "plain" / tp["split_audio_file"]))
                assert (info.samplerate, info.channels, info.format) == (16000, 1, "WAV")
                mixed_seconds = sf.info(str(tmp_path / "mixed" / tm["split_audio_file"])).duration
                assert abs(info.duration - mixed_seconds) < 0.01  # the same speech, only stored differently


def test_empty_label_is_an_error_unless_blind(tmp_path):
    record = dialogue(tmp_path, "en_1")
    record["turns"][0]["emotion"] = ""
    with pytest.raises(DataError, match="unknown label ''"):
        convert.convert([write_jsonl(tmp_path / "t1.jsonl", [record])], tmp_path / "out")


def test_blind_test_set_without_labels_and_replies(tmp_path):
    record = dialogue(tmp_path, "en_1", ("neutral", "surprised", "sad"))
    for turn in record["turns"]:
        del turn["response_text"]
    del record["turns"][0]["emotion"], record["turns"][2]["emotion"], record["turns"][2]["text"]
    src = write_jsonl(tmp_path / "t1.jsonl", [record])
    with pytest.raises(DataError, match="missing field 'emotion'"):
        convert.convert([src], tmp_path / "out")
    convert.convert([src], tmp_path / "out", blind=True, name="test")
    entry = annotation(tmp_path / "out" / "test.json")[0]
    assert entry["text"] == "" and entry["Q"] == ""
    assert [t["emotion"] for t in entry["turns"]] == ["", "surprise", ""]  # present labels are still checked
    assert [t.get("reply") for t in entry["turns"]] == ["", "", None]
    record["turns"][1]["emotion"] = "bored"
    with pytest.raises(DataError, match="unknown label 'bored'"):
        convert.convert([write_jsonl(src, [record])], tmp_path / "out", blind=True)


# ------------------------------------------------------------------------------------------- the evaluated turn
def test_every_entry_keeps_its_release_record_and_evaluated_turn(tmp_path):
    record = dialogue(tmp_path, "zh_0001_0001")
    src = write_jsonl(tmp_path / "task1_3.jsonl", [record])  # task 1 with 3 turns, not task 3
    convert.convert([src], tmp_path / "out")
    entry = annotation(tmp_path / "out" / "train.json")[0]
    assert entry["task"] == "emotional_trajectory"
    assert entry["release_record"] == record and entry["source"] == f"{src}:1"
    assert (entry["eval_turn_id"], entry["eval_turn_from"]) == (3, "last_turn")


def test_empathy_sample_ends_at_the_second_non_neutral_turn(tmp_path):
    emotions = ("neutral", "sad", "neutral", "anger", "fear")
    record = dialogue(tmp_path, "en_1", emotions)
    src = write_jsonl(tmp_path / "HD-Track1-T3.jsonl", [record])
    convert.convert([src], tmp_path / "out")
    entry = annotation(tmp_path / "out" / "train.json")[0]
    assert entry["task"] == "empathy"
    assert (entry["Q"], entry["text"], entry["eval_turn_id"]) == ("user words 4", "reply 4", 4)
    assert [t["emotion"] for t in entry["turns"]] == ["neutral", "sad", "neutral", "anger"]  # turn 5 left out
    assert [t.get("reply") for t in entry["turns"]] == ["reply 1", "reply 2", "reply 3", None]
    assert entry["release_record"]["turns"][4]["emotion"] == "fear"  # the package copies the whole dialogue
    report = json.loads((tmp_path / "out" / "train_report.json").read_text())
    assert report["eval_turns"] == {"empathy: labels": 1} and report["turns"] == 4


def test_empathy_dialogue_with_fewer_than_two_non_neutral_turns_is_invalid(tmp_path):
    records = [dialogue(tmp_path, "en_1", ("neutral", "sad", "neutral")), dialogue(tmp_path, "en_2"),
               dialogue(tmp_path, "en_3", ("neutral",) * 3)]
    src = write_jsonl(tmp_path / "HD-Track1-T3.jsonl", records)
    with pytest.raises(DataError, match=r"T3\.jsonl:1: dialogue en_1: no evaluated turn for task empathy: 1 "
                                        r"non-neutral turn\(s\)") as caught:
        convert.convert([src], tmp_path / "out")
    assert "T3.jsonl:3: dialogue en_3: no evaluated turn" in str(caught.value)
    convert.convert([src], tmp_path / "out", skip_invalid=True)
    assert [e["id"] for e in annotation(tmp_path / "out" / "train.json")] == ["en_2"]
    assert json.loads((tmp_path / "out" / "train_report.json").read_text())["skipped"] == {"no_eval_turn": 2}


def test_strict_mode_reports_every_invalid_record_in_one_pass(tmp_path, capsys):
    missing_audio = dialogue(tmp_path, "en_3")
    (tmp_path / missing_audio["turns"][1]["split_audio_file"]).unlink()
    records = [dialogue(tmp_path, "en_1"), "{not json", missing_audio,
               dialogue(tmp_path, "en_4", ("neutral", "bored")), dialogue(tmp_path, "en_1")]
    src = write_jsonl(tmp_path / "t1.jsonl", records)
    out = tmp_path / "out"
    assert convert.main([str(src), "-o", str(out)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith(f"error: {src}:2: malformed JSON")
    assert err[1].startswith(f"error: {src}:3: dialogue en_3, turn 2: audio file not found")
    assert err[2].startswith(f"error: {src}:4: dialogue en_4, turn 2: field 'emotion': unknown label 'bored'")
    assert err[3] == f"error: {src}:5: dialogue en_1 task emotional_trajectory already given by {src}:1"
    assert err[4] == "error: 4 invalid record(s); nothing written (--skip-invalid skips and counts them)"
    assert len(err) == 5 and outputs(out) == []


def test_strict_mode_prints_the_first_fifty_invalid_records_then_a_count(tmp_path, capsys):
    src = write_jsonl(tmp_path / "t1.jsonl", [dialogue(tmp_path, "en_0")] + ["{bad"] * 53)
    assert convert.main([str(src), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 52 and err[49].startswith(f"error: {src}:51: malformed JSON")
    assert err[50:] == ["error: ... and 3 more",
                        "error: 53 invalid record(s); nothing written (--skip-invalid skips and counts them)"]


def test_task_option_beats_the_record_field_which_beats_the_file_name(tmp_path):
    record = {**dialogue(tmp_path, "en_1", ("sad", "happy", "neutral")), "task": "emotional_reasoning"}
    src = write_jsonl(tmp_path / "HD-Track1-T3.jsonl", [record])
    convert.convert([src], tmp_path / "a")
    assert annotation(tmp_path / "a" / "train.json")[0]["task"] == "emotional_reasoning"
    convert.convert([src], tmp_path / "b", task="empathy")
    assert annotation(tmp_path / "b" / "train.json")[0]["task"] == "empathy"


def test_language_comes_from_the_release_folder_when_the_id_has_none(tmp_path):
    (tmp_path / "zh").mkdir()
    record = dialogue(tmp_path / "zh", "task1_3_0001")  # English words, but the release's zh/ folder
    convert.convert([write_jsonl(tmp_path / "zh" / "HD-Track1-T1.jsonl", [record])], tmp_path / "out")
    assert annotation(tmp_path / "out" / "train.json")[0]["language"] == "zh"

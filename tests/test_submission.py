"""The challenge package (submission.py, evaluate.py --submission-dir / --validate-package): which turn is answered,
the package written from a blind release decoded by the tiny demo model, and the validator's verdicts."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import evaluate
from humdial import submission
from humdial.submission import PackageError, speak, validate_package
from humdial.tasks import evaluated_turn, task_from_name

REPO = Path(__file__).resolve().parent.parent
# A TTS stand-in: writes a short tone to {out} and the text it was given next to it, to see what arrived.
ECHO_TTS = (f"{shlex.quote(sys.executable)} -c \"import sys, numpy, soundfile; "
            "soundfile.write(sys.argv[1], numpy.full(800, 0.1), 8000); "
            "open(sys.argv[1] + '.txt', 'w', encoding='utf-8').write(sys.argv[3])\" {out} -- {text}")


def turns(emotions, replies):
    return [{"turn_id": n, **({"emotion": e} if e is not None else {}), "response_text": r}
            for n, (e, r) in enumerate(zip(emotions, replies), start=1)]


# ---------------------------------------------------------------------------------------------- the evaluated turn
def test_trajectory_and_reasoning_answer_the_last_turn():
    for task in ("emotional_trajectory", "emotional_reasoning"):
        assert evaluated_turn(turns(["sad", "happy", "neutral"], ["a", "b", ""]), task) == (2, "last_turn")


@pytest.mark.parametrize("emotions, expected", [
    (["neutral", "sad", "neutral", "anger", "fear"], 3),  # the 2nd non-neutral, not the last
    (["happy", "sad", "neutral"], 1),
    (["Angry", "calm", "surprised"], 2),  # aliases: calm is neutral
])
def test_empathy_answers_the_second_non_neutral_turn(emotions, expected):
    assert evaluated_turn(turns(emotions, ["r"] * len(emotions)), "empathy") == (expected, "labels")


@pytest.mark.parametrize("emotions", [["neutral", "neutral", "neutral"], ["neutral", "sad", "neutral"]])
def test_empathy_without_two_non_neutral_turns_has_no_evaluated_turn(emotions):
    with pytest.raises(ValueError, match="non-neutral turn"):
        evaluated_turn(turns(emotions, ["r"] * 3), "empathy")


def test_unlabelled_empathy_turns_are_read_as_the_scorer_reads_them_unless_the_replies_mark_one():
    marked = turns([None] * 4, ["a", "b", "", ""])
    assert evaluated_turn(marked, "empathy") == (2, "first_unanswered_turn")
    unmarked = turns([None] * 4, ["", "", "", ""])  # an unlabelled turn is not neutral: the 2nd turn
    assert evaluated_turn(unmarked, "empathy") == (1, "unlabelled_as_non_neutral")
    gap = turns([None, "neutral", None, None], ["a", "", "b", ""])  # replies with a gap mark nothing
    assert evaluated_turn(gap, "empathy") == (2, "unlabelled_as_non_neutral")
    labelled = turns(["neutral", "sad", "neutral", "fear"], ["a", "", "", ""])  # labels beat the replies
    assert evaluated_turn(labelled, "empathy") == (3, "labels")


def test_task_is_the_number_after_t_or_task_in_the_file_name():
    assert task_from_name(Path("train/zh/task1_3.jsonl")) == "emotional_trajectory"  # task 1, 3 turns
    assert task_from_name(Path("task2_4.jsonl")) == "emotional_reasoning"
    assert task_from_name(Path("task3_5.jsonl")) == "empathy"
    assert task_from_name(Path("zh/HD-Track1-T3.jsonl")) == "empathy"
    assert task_from_name(Path("HD-Track1/task1_3/list.jsonl")) == "emotional_trajectory"  # the folder's name
    assert task_from_name(Path("zh/HD-Track1.jsonl")) is None


def test_language_comes_from_field_folder_id_or_text():
    record = {"dialogue_id": "task2_4_en_0002_0014", "turns": [{"text": "你好"}]}
    assert submission.release_language(record, "HD-Track1-Test") == "en"
    assert submission.release_language(record, "zh") == "zh"
    assert submission.release_language({**record, "language": "en"}, "zh") == "en"
    assert submission.release_language({**record, "dialogue_id": "d7"}, "x") == "zh"


# ---------------------------------------------------------------------------------------------- TTS
def test_speak_hands_the_text_over_as_one_argument_whatever_it_holds(tmp_path):
    text = ' -- "quoted", {out} {text} $HOME; 你好 '
    out = tmp_path / "a" / "x_2_response.wav"
    speak(text, out, ECHO_TTS)
    assert sf.info(str(out)).frames == 800
    assert Path(str(out) + ".txt").read_text(encoding="utf-8") == text


def test_speak_failures_name_the_command_and_leave_no_wav(tmp_path):
    out = tmp_path / "x.wav"
    with pytest.raises(PackageError, match="TTS program not found: no-such-tts"):
        speak("hi", out, "no-such-tts -o {out} -- {text}")
    failing = f"{shlex.quote(sys.executable)} -c \"import sys; sys.exit('voice missing')\" {{out}} -- {{text}}"
    with pytest.raises(PackageError, match="failed with exit code 1: voice missing"):
        speak("hi", out, failing)
    silent = f"{shlex.quote(sys.executable)} -c \"open(__import__('sys').argv[1], 'w')\" {{out}} -- {{text}}"
    with pytest.raises(PackageError, match="wrote no usable audio"):
        speak("hi", out, silent)
    with pytest.raises(PackageError, match=r"must hold \{text\} and \{out\}"):
        speak("hi", out, "espeak-ng -w {out}")


# ---------------------------------------------------------------------------------------------- a blind release
def write_tone(path: Path, seconds: float = 0.4, rate: int = 8000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), 0.3 * np.sin(2 * np.pi * 330 * t), rate)


def blind_dialogue(folder: Path, task_number: int, dialogue_id: str, emotions, replies) -> dict:
    """A test-release dialogue: audio per user turn (tones) under HD-Track1-T<n>/, history replies given, the
    answered turn's reply empty; labels only where given."""
    record_turns = []
    for n, (emotion, reply) in enumerate(zip(emotions, replies), start=1):
        audio = f"HD-Track1-T{task_number}/{dialogue_id}_{n}.wav"
        write_tone(folder / audio)
        turn = {"turn_id": n, "text": f"spoken words {n}", "split_audio_file": audio, "response_text": reply,
                "response_audio": ""}
        if emotion is not None:
            turn["emotion"] = emotion
        record_turns.append(turn)
    return {"dialogue_id": dialogue_id, "turns": record_turns}


def write_blind_release(root: Path) -> list[Path]:
    """zh and en, Task 1 and Task 3, shaped like HD-Track1-Test: <lang>/HD-Track1-T<n>.jsonl + audio folders."""
    files = {
        ("zh", 1): [blind_dialogue(root / "zh", 1, f"task1_3_zh_000{i}", [None] * 3, ["r1", "r2", ""])
                    for i in (1, 2)],
        ("en", 1): [blind_dialogue(root / "en", 1, "task1_4_en_0001", [None] * 4, ["r1", "r2", "r3", ""])],
        ("zh", 3): [
            blind_dialogue(root / "zh", 3, "task3_5_zh_0001", ["neutral", "sad", "neutral", "anger", "fear"],
                           ["r1", "r2", "r3", "", ""]),  # labels: turn 4
            blind_dialogue(root / "zh", 3, "task3_4_zh_0002", [None] * 4, ["r1", "r2", "", ""]),  # marked: turn 3
            blind_dialogue(root / "zh", 3, "task3_3_zh_0003", [None] * 3, ["", "", ""]),  # neither: turn 2
        ],
        ("en", 3): [blind_dialogue(root / "en", 3, "task3_3_en_0001", ["happy", "sad", "neutral"],
                                   ["r1", "", ""])],  # labels: turn 2
    }
    paths = []
    for (language, number), records in files.items():
        path = root / language / f"HD-Track1-T{number}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
        paths.append(path)
    return paths


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The blind release converted with convert.py --blind, decoded by the tiny demo model into a package."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("the default TTS command needs espeak-ng (apt-get install espeak-ng)")
    tmp = tmp_path_factory.mktemp("release")
    test_files = write_blind_release(tmp / "HD-Track1-Test")
    converted = subprocess.run([sys.executable, "convert.py", *map(str, test_files), "-o", str(tmp / "ann"),
                                "--blind", "--name", "test"], cwd=REPO, capture_output=True, text=True)
    assert converted.returncode == 0, converted.stderr
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        rc = evaluate.main(["--cfg-path", "configs/demo.yaml", "--ann", str(tmp / "ann" / "test.json"),
                            "--submission-dir", str(tmp / "HD-Track1"), "--out-dir", str(tmp / "eval"),
                            "--device", "cpu", "--num-beams", "1", "--max-new-tokens", "8", "--num-workers", "0"])
    predictions = {(r["id"], r["task"]): r["prediction"] for r in read_lines(tmp / "eval" / "predictions.jsonl")}
    report = json.loads((tmp / "ann" / "test_report.json").read_text())
    return {"dir": tmp / "HD-Track1", "tests": test_files, "rc": rc, "predictions": predictions,
            "report": report, "tmp": tmp}


def test_blind_conversion_counts_how_each_evaluated_turn_was_found(package):
    assert package["report"]["eval_turns"] == {"emotional_trajectory: last_turn": 3, "empathy: labels": 2,
                                               "empathy: first_unanswered_turn": 1,
                                               "empathy: unlabelled_as_non_neutral": 1}


def test_package_has_the_release_layout_and_the_replies_in_the_evaluated_turns(package):
    out, tests = package["dir"], package["tests"]
    assert package["rc"] == 0
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "en/HD-Track1-T1.jsonl", "en/HD-Track1-T3.jsonl", "en/HD-Track1-T3/task3_3_en_0001_2_response.wav",
        "zh/HD-Track1-T1.jsonl", "zh/HD-Track1-T3.jsonl", "zh/HD-Track1-T3/task3_3_zh_0003_2_response.wav",
        "zh/HD-Track1-T3/task3_4_zh_0002_3_response.wav", "zh/HD-Track1-T3/task3_5_zh_0001_4_response.wav"]
    answered_turn = {"task1_3_zh_0001": 3, "task1_3_zh_0002": 3, "task1_4_en_0001": 4, "task3_5_zh_0001": 4,
                     "task3_4_zh_0002": 3, "task3_3_zh_0003": 2, "task3_3_en_0001": 2}
    for test_file in tests:
        released = read_lines(test_file)
        answered = read_lines(out / test_file.parent.name / test_file.name)
        assert [r["dialogue_id"] for r in answered] == [r["dialogue_id"] for r in released]  # one line each
        task = "empathy" if test_file.stem.endswith("T3") else "emotional_trajectory"
        for given, got in zip(released, answered):
            target = answered_turn[given["dialogue_id"]]
            for turn, got_turn in zip(given["turns"], got["turns"], strict=True):
                if turn["turn_id"] != target:
                    assert got_turn == turn
                    continue
                reply = package["predictions"][given["dialogue_id"], task].strip()
                assert reply and got_turn["response_text"] == reply
                assert {k: v for k, v in got_turn.items() if k not in ("response_text", "response_audio")} == \
                       {k: v for k, v in turn.items() if k not in ("response_text", "response_audio")}
                if task == "empathy":
                    wav = out / test_file.parent.name / got_turn["response_audio"]
                    assert wav.name == f"{given['dialogue_id']}_{target}_response.wav"
                    assert sf.info(str(wav)).duration > 0.1  # speech, read back


def test_validator_accepts_the_package(package, capsys):
    assert validate_package(package["dir"], package["tests"]) == []
    assert evaluate.main(["--validate-package", str(package["dir"]),
                          "--test-jsonl", *map(str, package["tests"])]) == 0
    assert capsys.readouterr().out.strip().endswith("valid package")


def drop_a_dialogue(out: Path) -> str:
    path = out / "zh" / "HD-Track1-T1.jsonl"
    path.write_text(path.read_text(encoding="utf-8").splitlines(keepends=True)[0], encoding="utf-8")
    return "zh/HD-Track1-T1.jsonl: 1 test dialogue(s) missing, e.g. task1_3_zh_0002"


def change_a_text(out: Path) -> str:
    path = out / "en" / "HD-Track1-T1.jsonl"
    record = read_lines(path)[0]
    record["turns"][1]["text"] = "other words"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return "dialogue task1_4_en_0001, turn 2: field 'text' changed ('spoken words 2' -> 'other words')"


def empty_a_reply(out: Path) -> str:
    path = out / "en" / "HD-Track1-T3.jsonl"
    record = read_lines(path)[0]
    record["turns"][1]["response_text"] = " "
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return "dialogue task3_3_en_0001, turn 2: empty reply"


def delete_a_wav(out: Path) -> str:
    (out / "zh" / "HD-Track1-T3" / "task3_4_zh_0002_3_response.wav").unlink()
    return "dialogue task3_4_zh_0002, turn 3: spoken reply: audio file not found"


def answer_the_last_turn_instead(out: Path) -> str:
    path = out / "zh" / "HD-Track1-T3.jsonl"
    records = read_lines(path)
    last, target = records[0]["turns"][4], records[0]["turns"][3]
    last["response_text"], target["response_text"] = target["response_text"], ""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return "dialogue task3_5_zh_0001, turn 5: field 'response_text' changed ('' -> "


@pytest.mark.parametrize("breakage", [drop_a_dialogue, change_a_text, empty_a_reply, delete_a_wav,
                                      answer_the_last_turn_instead])
def test_validator_rejects_a_broken_package(package, tmp_path, capsys, breakage):
    broken = tmp_path / "HD-Track1"
    shutil.copytree(package["dir"], broken)
    expected = breakage(broken)
    problems = validate_package(broken, package["tests"])
    assert any(expected in problem for problem in problems), problems
    assert evaluate.main(["--validate-package", str(broken), "--test-jsonl", *map(str, package["tests"])]) == 1
    assert "INVALID package" in capsys.readouterr().out


def test_validator_reports_missing_files_and_unreadable_lines(package, tmp_path):
    assert validate_package(tmp_path / "nothing", package["tests"][:1]) == [
        f"{tmp_path / 'nothing' / 'zh' / 'HD-Track1-T1.jsonl'}: file not found",
        f"{tmp_path / 'nothing' / 'zh' / 'HD-Track1-T1.jsonl'}: 2 test dialogue(s) missing, e.g. "
        "task1_3_zh_0001, task1_3_zh_0002"]
    broken = tmp_path / "HD-Track1"
    shutil.copytree(package["dir"], broken)
    path = broken / "zh" / "HD-Track1-T1.jsonl"
    path.write_text(path.read_text(encoding="utf-8") + "{cut off\n", encoding="utf-8")
    assert validate_package(broken, package["tests"][:1]) == [f"{path}:3: malformed JSON: Expecting property name "
                                                               "enclosed in double quotes (column 2)"]


def test_a_package_is_never_written_over_another_one(package, capsys):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        rc = evaluate.main(["--cfg-path", "configs/demo.yaml", "--ann", str(package["tmp"] / "ann" / "test.json"),
                            "--submission-dir", str(package["dir"]), "--out-dir", str(package["tmp"] / "eval2")])
    assert rc == 2 and "already exists and is not an empty folder" in capsys.readouterr().err
    assert not (package["tmp"] / "eval2").exists()  # refused before decoding


def test_a_failing_tts_leaves_no_package(package, tmp_path):
    entries = json.loads((package["tmp"] / "ann" / "test.json").read_text())["annotation"]
    records = [{"id": e["id"], "task": e["task"], "prediction": "a reply"} for e in entries]
    with pytest.raises(PackageError, match="TTS program not found"):
        submission.write_package(records, entries, tmp_path / "pkg", {"zh": "no-such-tts {out} -- {text}",
                                                                     "en": "no-such-tts {out} -- {text}"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PackageError, match="no prediction for dialogue task1_3_zh_0002"):
        submission.write_package(records[:1], entries, tmp_path / "pkg", {})
    written = submission.write_package(records, entries, tmp_path / "pkg", {"zh": ECHO_TTS, "en": ECHO_TTS})
    assert len([p for p in written if p.suffix == ".wav"]) == 4
    assert validate_package(tmp_path / "pkg", package["tests"]) == []

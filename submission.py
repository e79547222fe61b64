"""What the challenge takes: which turn of a release dialogue is answered, the submission package, and the
Nota-style `testset_id,text` CSV, each written and checked against the test set.

    python evaluate.py --ann data/humdial/test.json --submission-dir outputs/HD-Track1       # decode + package
    python evaluate.py --validate-package outputs/HD-Track1 --test-jsonl zh/HD-Track1-T1.jsonl en/HD-Track1-T3.jsonl
    python evaluate.py --validate outputs/demo/eval_test/submission_emotional_trajectory.csv \
        --ann data/demo/ann/test.json --task emotional_trajectory

The package mirrors the test release: `<lang>/HD-Track1-T<n>.jsonl`, each test dialogue copied unchanged with the
model's reply in the evaluated turn's `response_text`; Task 3 replies are also spoken, into
`<lang>/HD-Track1-T3/<dialogue_id>_<turn_id>_response.wav` (and that turn's `response_audio` names the file).

The evaluated turn: Task 1 and Task 2 answer the last turn. Task 3 (empathy) is scored at the second user turn
whose emotion is not neutral, with the turns up to it as history: the organisers' scorer
(ASLP-lab/Hum-Dial, Emotional_Intelligence/eval_task3.py, `find_target_turn`) picks that turn from the emotion
labels of the submitted file, reading a turn without a label as not neutral. A test file without labels is read
the same way, unless it marks the turn by its replies (the turns before it have one, it and the later ones none):
then that first unanswered turn is answered. `evaluated_turn` says which of the three decided.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import re
import shlex
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from labels import LABEL_ALIASES, TASK_BY_NUMBER, text_language

SUBMISSION_HEADER = ["testset_id", "text"]
REPLY_KEYS = ("response_text", "response_txt")  # the training files spell it response_txt
REPLY_KEY = "response_text"  # what the scorer reads
AUDIO_KEY = "response_audio"
EMPATHY = "empathy"
EMPATHY_TURN_RANK = 2  # the scorer answers the 2nd non-neutral turn (eval_task3.find_target_turn)
TASK_NUMBER = {task: number for number, task in TASK_BY_NUMBER.items()}
LANGUAGES = ("zh", "en")
_TASK_IN_NAME = re.compile(r"(?:^|[^a-z0-9])t(?:ask)?[-_]?([123])(?![0-9])", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{(text|out)\}")
_NOTA_ID = re.compile(r"test\d{4}")  # the ids of Nota's evaluator sets (its submission_validator.py)
_NOTA_LIKE_ID = re.compile(r"test\d")


class PackageError(ValueError):
    """A package that cannot be written (a dialogue without a prediction, a failing TTS command ...)."""


def plain_name_problem(value: object) -> str | None:
    """Why a dialogue id, turn id, language or output name cannot name a file inside a folder (None when it can):
    they become parts of output paths, so a path separator, `..` or nothing would write outside the folder."""
    name = str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else None
    if name is None or name.strip() in ("", ".", "..") or any(c in name for c in "/\\") or not name.isprintable():
        return (f"{value!r} is not a plain file name (it becomes part of a file name inside the output folder: no "
                "'/', '\\', '..', control characters or empty)")
    return None


# ---------------------------------------------------------------------------------------------- the release
def task_from_name(path: Path) -> str | None:
    """The task a file or folder name spells (`HD-Track1-T2.jsonl`, `task1_3.jsonl` = task 1 with 3 turns), if
    any: the number right after `T`/`task`, so neither `Track1` nor the turn count `_3` is read as a task."""
    for name in (path.stem, path.parent.name):
        match = _TASK_IN_NAME.search(name)
        if match:
            return TASK_BY_NUMBER[match.group(1)]
    return None


def package_file_name(task: str) -> str:
    """`HD-Track1-T<n>.jsonl`, the name the release and the package give a task's dialogues."""
    return f"HD-Track1-T{TASK_NUMBER[task]}.jsonl"


def response_wav(dialogue_id: str, turn_id: object) -> str:
    """Where a Task 3 reply is spoken, relative to the language folder of the package."""
    return f"HD-Track1-T{TASK_NUMBER[EMPATHY]}/{dialogue_id}_{turn_id}_response.wav"


def turn_id_of(turn: Mapping[str, Any], index: int) -> object:
    """The release's turn_id (the turn's position, from 1, for a record without one)."""
    return turn.get("turn_id", index + 1)


def release_language(record: Mapping[str, Any], folder: str) -> str:
    """`language` field, else the release's language folder (`zh/`, `en/`), else a `zh`/`en` part of the
    dialogue id (`zh_0102_0001`, `task2_4_en_0002_0014`), else zh when the turns' text has CJK characters."""
    if isinstance(record.get("language"), str):
        return record["language"]
    if folder in LANGUAGES:
        return folder
    parts = str(record.get("dialogue_id", "")).lower().split("_")
    for language in LANGUAGES:
        if language in parts:
            return language
    turns = record.get("turns") if isinstance(record.get("turns"), list) else []
    return text_language(" ".join(t["text"] for t in turns if isinstance(t, dict) and isinstance(t.get("text"), str)))


def has_reply(turn: Mapping[str, Any]) -> bool:
    return any(isinstance(turn.get(key), str) and turn[key].strip() for key in REPLY_KEYS)


def is_neutral(label: object) -> bool:
    """A neutral label (or an alias of it); a missing or empty label is not neutral, as the scorer reads it."""
    key = label.strip().lower() if isinstance(label, str) else ""
    return LABEL_ALIASES.get(key, key) == "neutral"


def first_unanswered_turn(turns: list[Mapping[str, Any]]) -> int | None:
    """The turn a test file marks by its replies: every turn before it has one, it and every later one none."""
    answered = [has_reply(t) for t in turns]
    count = answered.index(False) if False in answered else len(answered)
    if 0 < count < len(turns) and not any(answered[count:]):
        return count
    return None


def evaluated_turn(turns: list[Mapping[str, Any]], task: str) -> tuple[int, str]:
    """(index of the turn whose reply is scored, what decided it: last_turn | labels | first_unanswered_turn |
    unlabelled_as_non_neutral). ValueError when an empathy dialogue has too few non-neutral turns."""
    if not turns:
        raise ValueError("the dialogue has no turns")
    if task != EMPATHY:
        return len(turns) - 1, "last_turn"
    labels = [t.get("emotion") for t in turns]
    if all(isinstance(label, str) and label.strip() for label in labels):
        how = "labels"
    else:
        marked = first_unanswered_turn(turns)
        if marked is not None:
            return marked, "first_unanswered_turn"
        how = "unlabelled_as_non_neutral"
    non_neutral = [i for i, label in enumerate(labels) if not is_neutral(label)]
    if len(non_neutral) < EMPATHY_TURN_RANK:
        raise ValueError(f"{len(non_neutral)} non-neutral turn(s) ({', '.join(map(str, labels))}): the empathy "
                         f"task is scored at the non-neutral turn number {EMPATHY_TURN_RANK}")
    return non_neutral[EMPATHY_TURN_RANK - 1], how


@dataclass(frozen=True)
class Release:
    """One test dialogue as the release gives it, with where it was read and which package file it goes to."""
    where: str  # "file:line"
    record: dict
    task: str
    language: str

    def package_path(self, out_dir: Path) -> Path:
        """Where the package answers it: out_dir/<lang>/HD-Track1-T<n>.jsonl."""
        return out_dir / self.language / package_file_name(self.task)

    def path_problem(self) -> str | None:
        """Why its id, language or turn ids would name a path outside the package (None when they do not)."""
        parts = {"dialogue_id": self.record["dialogue_id"], "language": self.language}
        parts.update({f"turn_id of turn {n}": turn_id_of(t, n - 1) for n, t in enumerate(self.record["turns"], 1)})
        for key, value in parts.items():
            problem = plain_name_problem(value)
            if problem:
                return f"{self.where}: {key} {problem}"
        return None


def releases_of_entries(entries: Iterable[Mapping[str, Any]]) -> list[Release]:
    """The release dialogues behind annotation entries (convert.py keeps each one as `release_record`)."""
    releases = []
    for entry in entries:
        if "release_record" not in entry or entry.get("task") not in TASK_NUMBER:
            raise PackageError(f"{entry.get('source', entry.get('id', entry.get('path')))}: not a HumDial dialogue "
                               f"converted by convert.py (no release_record, or task {entry.get('task')!r} is "
                               f"not one of {', '.join(TASK_NUMBER)}): re-run convert.py on the test JSONL")
        release = Release(entry["source"], entry["release_record"], entry["task"], entry["language"])
        if release.path_problem():
            raise PackageError(release.path_problem())
        releases.append(release)
    return releases


def read_releases(paths: Iterable[str | os.PathLike]) -> tuple[list[Release], list[str]]:
    """(the test dialogues of release JSONL files, problems reading them). The task comes from a record's `task`
    field, else the file name; the language as release_language tells."""
    releases, problems = [], []
    for path in map(Path, paths):
        lines, read_problems = read_jsonl_objects(path)
        problems += read_problems
        for where, record in lines:
            task = record.get("task") if record.get("task") in TASK_NUMBER else task_from_name(path)
            if task is None:
                problems.append(f"{where}: cannot tell the task: name the file HD-Track1-T<n>.jsonl as the "
                                "release does")
                continue
            release = Release(where, record, task, release_language(record, path.parent.name))
            if release.path_problem():
                problems.append(release.path_problem())
                continue
            releases.append(release)
    return releases, problems


def read_jsonl_objects(path: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(("file:line", object) for each non-blank line, problems: a missing file, malformed lines, non-objects)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], [f"{path}: file not found"]
    except UnicodeDecodeError as e:
        return [], [f"{path}: not UTF-8 text: {e}"]
    objects, problems = [], []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
            continue
        if not (isinstance(value, dict) and isinstance(value.get("dialogue_id"), str)
                and isinstance(value.get("turns"), list) and all(isinstance(t, dict) for t in value["turns"])):
            problems.append(f"{where}: expected a dialogue object with a 'dialogue_id' and a list of 'turns' objects")
            continue
        objects.append((where, value))
    return objects, problems


# ---------------------------------------------------------------------------------------------- the package
def check_package_dir_free(out_dir: Path) -> None:
    """A package is never written over another one: the folder must be new or empty."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PackageError(f"{out_dir} already exists and is not an empty folder: choose a new --submission-dir "
                           "(a package is never overwritten)")


def answered_record(record: Mapping[str, Any], turn_index: int, reply: str, audio: str | None) -> dict:
    """The release record unchanged but for the evaluated turn's reply (and, for Task 3, its audio)."""
    answered = copy.deepcopy(dict(record))
    turn = answered["turns"][turn_index]
    turn[REPLY_KEY] = reply
    if audio is not None:
        turn[AUDIO_KEY] = audio
    return answered


def evaluated_turn_index(entry: Mapping[str, Any]) -> int:
    """Where the entry's `eval_turn_id` sits in its release record."""
    turns = entry["release_record"]["turns"]
    for index, turn in enumerate(turns):
        if turn_id_of(turn, index) == entry["eval_turn_id"]:
            return index
    raise PackageError(f"{entry['source']}: dialogue {entry['id']} has no turn {entry['eval_turn_id']!r}")


def write_package(records: list[dict[str, Any]], entries: list[dict[str, Any]], out_dir: Path,
                  tts_commands: Mapping[str, str]) -> list[Path]:
    """The package for the decoded `records` of the annotation `entries` (one line per entry, in annotation
    order); Task 3 replies are spoken with the language's TTS command. It is made in a staging folder renamed to
    out_dir at the end, so a failure (a TTS error, a missing prediction) leaves nothing. Returns its files."""
    check_package_dir_free(out_dir)
    predictions = predictions_of_entries(records, entries)
    releases = releases_of_entries(entries)
    check_tts_commands(releases, tts_commands)
    staging = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.partial")
    lines: dict[Path, list[dict]] = defaultdict(list)
    staging.mkdir(parents=True)
    try:
        for entry, release in zip(entries, releases):
            reply = predictions[entry["id"], entry["task"]].strip()
            path = release.package_path(Path())  # relative to the package
            audio = None
            if entry["task"] == EMPATHY:
                audio = response_wav(entry["id"], entry["eval_turn_id"])
                if reply:  # nothing to speak: the package check reports the empty reply
                    speak(reply, staging / path.parent / audio, tts_command(tts_commands, release.language))
            lines[path].append(answered_record(release.record, evaluated_turn_index(entry), reply, audio))
        for path, answered in lines.items():
            (staging / path).parent.mkdir(parents=True, exist_ok=True)
            (staging / path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in answered),
                                        encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return sorted(p for p in out_dir.rglob("*") if p.is_file())


def predictions_of_entries(records: list[dict[str, Any]], entries: list[dict[str, Any]]) -> dict[tuple, str]:
    """(id, task) -> prediction: one for every entry and none for anything else, or a PackageError."""
    predictions = {(r["id"], r["task"]): r["prediction"] for r in records}
    for entry in entries:
        if (entry["id"], entry["task"]) not in predictions:
            raise PackageError(f"{entry['source']}: no prediction for dialogue {entry['id']} ({entry['task']}): "
                               "a package needs every test dialogue (decode without --limit)")
    unknown = sorted(set(predictions) - {(e["id"], e["task"]) for e in entries})
    if unknown:
        raise PackageError(f"{len(unknown)} prediction(s) answer no dialogue of the annotation, e.g. "
                           f"{', '.join(f'{i} ({t})' for i, t in unknown[:3])}: were they decoded from another one?")
    return predictions


def tts_command(tts_commands: Mapping[str, str], language: str) -> str:
    """The language's TTS command template, checked (tts_command_problem)."""
    if language not in tts_commands:
        raise PackageError(f"no TTS command for language {language!r}: set submission.tts_command.{language}")
    problem = tts_command_problem(tts_commands[language])
    if problem:
        raise PackageError(f"submission.tts_command.{language} ({tts_commands[language]!r}) {problem}")
    return tts_commands[language]


def check_tts_commands(releases: Iterable[Release], tts_commands: Mapping[str, str]) -> None:
    """Every TTS command a package of these dialogues needs (Task 3's languages), checked before anything is
    decoded or spoken."""
    for language in sorted({release.language for release in releases if release.task == EMPATHY}):
        tts_command(tts_commands, language)


def tts_command_problem(command: str) -> str | None:
    """Why a TTS command template is not safe to run (None when it is): it needs {out}, and {text} as a whole
    argument after `--` (end of options) or joined to its option (`--text={text}`), so that a reply is always
    spoken as text: a reply `-f/etc/passwd` must not make espeak-ng read that file aloud."""
    try:
        args = shlex.split(command)
    except ValueError as e:
        return f"cannot be split into arguments: {e}"
    holding = [i for i, arg in enumerate(args) if "{text}" in arg]
    if not any("{out}" in arg for arg in args) or len(holding) != 1:
        return "must hold {text} and {out} ({text} in one argument)"
    i = holding[0]
    if (args[i] == "{text}" and "--" in args[1:i]) or re.fullmatch(r"--?[\w-]+=\{text\}", args[i]):
        return None
    return ("must pass {text} after `--` (end of options), e.g. 'espeak-ng -w {out} -- {text}', or as "
            "--option={text}: a reply that starts with a dash would be read as an option")


def speak(text: str, out: Path, command: str) -> None:
    """Runs the TTS command template (`{text}`, `{out}` placeholders) without a shell: each placeholder becomes
    exactly the text or the (absolute) path, whatever quotes, braces or leading dashes the text holds. The wav must
    come out readable."""
    problem = tts_command_problem(command)
    if problem:
        raise PackageError(f"submission.tts_command {command!r} {problem}")
    out.parent.mkdir(parents=True, exist_ok=True)
    values = {"text": text, "out": str(out.absolute())}
    argv = [_PLACEHOLDER.sub(lambda m: values[m.group(1)], arg) for arg in shlex.split(command)]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise PackageError(f"TTS program not found: {argv[0]} (install it, e.g. apt-get install espeak-ng, or "
                           "set submission.tts_command)") from e
    if result.returncode != 0:
        raise PackageError(f"TTS command {shlex.join(argv)!r} failed with exit code {result.returncode}: "
                           f"{result.stderr.strip()[-500:]}")
    problem = audio_problem(out)
    if problem:
        raise PackageError(f"TTS command {shlex.join(argv)!r} wrote no usable audio: {problem}")


def audio_problem(path: Path, read_samples: bool = False) -> str | None:
    """What is wrong with an audio file (missing, unreadable, no samples, truncated; with read_samples also
    undecodable or non-finite samples), or None."""
    if not path.is_file():
        return f"audio file not found: {path}"
    try:
        info = sf.info(str(path))
        samples = sf.read(str(path), dtype="float32")[0] if read_samples else None
    except (sf.LibsndfileError, RuntimeError) as e:
        return f"cannot read audio {path}: {e}"
    if info.frames == 0:
        return f"audio file has no samples: {path}"
    if wav_truncation(info):
        return f"audio file is truncated: {path} ({wav_truncation(info)})"
    if samples is not None and not np.isfinite(samples).all():
        return f"audio file has non-finite samples (NaN or inf): {path}"
    return None


_WAV_DATA_SIZE = re.compile(r"^data : (\d+) \(should be (\d+)\)", re.MULTILINE)


def wav_truncation(info: Any) -> str | None:
    """What a WAV header promises that its file does not hold (libsndfile's own reading of the header says
    `data : 64000 (should be 156)`), or None. libsndfile reads such a file as the few samples that are there,
    silently; a streamed WAV's placeholder sizes (0, 0xFFFFFFFF) mean "unknown", not truncated."""
    match = _WAV_DATA_SIZE.search(getattr(info, "extra_info", "") or "")
    if match and int(match[1]) not in (0, 0xFFFFFFFF) and int(match[1]) > int(match[2]):
        return f"its header declares {match[1]} bytes of samples, the file holds {match[2]}"
    return None


# ---------------------------------------------------------------------------------------------- checking a package
def validate_package(out_dir: str | os.PathLike, test_jsonl_paths: Iterable[str | os.PathLike]) -> list[str]:
    """Problems with a package (an empty list when it is fine), checked against the test JSONL files: every test
    dialogue present once, ids, turn ids, texts, audio paths and everything else unchanged, a non-empty reply in
    the evaluated turn, and for Task 3 its spoken reply (a readable, non-empty wav)."""
    releases, problems = read_releases(test_jsonl_paths)
    return problems + package_problems(Path(out_dir), releases)


def package_problems(out_dir: Path, releases: list[Release]) -> list[str]:
    """validate_package's checks, against release dialogues already read."""
    expected: dict[Path, dict[str, Release]] = defaultdict(dict)
    problems = []
    for release in releases:
        by_id = expected[release.package_path(out_dir)]
        dialogue_id = release.record["dialogue_id"]
        if dialogue_id in by_id:
            problems.append(f"{release.where}: dialogue {dialogue_id} is also at {by_id[dialogue_id].where}")
        by_id[dialogue_id] = release
    for path, by_id in sorted(expected.items()):
        problems += package_file_problems(path, by_id)
    return problems


def package_file_problems(path: Path, by_id: dict[str, Release]) -> list[str]:
    """One package file against its test dialogues."""
    answered, problems = read_jsonl_objects(path)
    seen: dict[str, str] = {}
    for where, record in answered:
        dialogue_id = record["dialogue_id"]
        if dialogue_id not in by_id:
            problems.append(f"{where}: dialogue {dialogue_id} is not in the test set")
        elif dialogue_id in seen:
            problems.append(f"{where}: dialogue {dialogue_id} again (first at {seen[dialogue_id]})")
        else:
            seen[dialogue_id] = where
            problems += answered_problems(where, record, by_id[dialogue_id], path.parent)
    missing = [i for i in by_id if i not in seen]
    if missing:
        problems.append(f"{path}: {len(missing)} test dialogue(s) missing, e.g. {', '.join(missing[:5])}")
    return problems


def answered_problems(where: str, answered: dict, release: Release, language_dir: Path) -> list[str]:
    """One answered dialogue against the test dialogue it copies."""
    record, dialogue_id = release.record, release.record["dialogue_id"]
    where = f"{where}: dialogue {dialogue_id}"
    problems = changed_fields(where, record, answered, ignore=("turns",))
    turns, answered_turns = record["turns"], answered["turns"]
    if len(turns) != len(answered_turns):
        return problems + [f"{where}: {len(answered_turns)} turns, the test dialogue has {len(turns)}"]
    try:
        target, _ = evaluated_turn(turns, release.task)
    except ValueError as e:
        return problems + [f"{release.where}: dialogue {dialogue_id}: no evaluated turn: {e}"]
    for index, (turn, got) in enumerate(zip(turns, answered_turns)):
        turn_where = f"{where}, turn {turn_id_of(turn, index)}"
        problems += changed_fields(turn_where, turn, got, ignore=(REPLY_KEY, AUDIO_KEY) if index == target else ())
        if index == target:
            problems += reply_problems(turn_where, got, release, turn_id_of(turn, index), language_dir)
    return problems


def changed_fields(where: str, given: Mapping[str, Any], answered: Mapping[str, Any], ignore: tuple[str, ...]
                   ) -> list[str]:
    """A problem for each field the package changed, added or dropped (but the `ignore`d ones)."""
    def shown(fields: Mapping[str, Any], key: str) -> str:
        return repr(fields[key]) if key in fields else "absent"

    return [f"{where}: field {key!r} changed ({shown(given, key)} -> {shown(answered, key)})"
            for key in sorted(set(given) | set(answered))
            if key not in ignore and (key in given, given.get(key)) != (key in answered, answered.get(key))]


def reply_problems(where: str, turn: dict, release: Release, turn_id: object, language_dir: Path) -> list[str]:
    """The evaluated turn: a non-empty one-string reply, and for Task 3 its wav (where response_audio says)."""
    reply = turn.get(REPLY_KEY)
    problems = [] if isinstance(reply, str) and reply.strip() else [f"{where}: empty reply ({REPLY_KEY}={reply!r})"]
    if release.task == EMPATHY:
        wav = response_wav(release.record["dialogue_id"], turn_id)
        if turn.get(AUDIO_KEY) not in (None, "", wav):
            problems.append(f"{where}: {AUDIO_KEY} is {turn[AUDIO_KEY]!r}, the spoken reply is at {wav!r}")
        problem = audio_problem(language_dir / wav)
        if problem:
            problems.append(f"{where}: spoken reply: {problem}")
    return problems


# ---------------------------------------------------------------------------------------------- the CSV
def submission_text(prediction: str) -> str:
    """One line per answer: line breaks inside an answer become spaces."""
    return " ".join(prediction.split())


def write_submissions(records: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """One `testset_id,text` CSV per task (a dialogue id appears once per task)."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    paths = []
    for task, task_records in sorted(by_task.items()):
        path = out_dir / f"submission_{task}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(SUBMISSION_HEADER)
            writer.writerows([r["id"], submission_text(r["prediction"])] for r in task_records)
        paths.append(path)
    return paths


def validate_submission(path: str | Path, expected_ids: set[str] | None = None) -> list[str]:
    """Problems with a submission CSV (an empty list when it is fine): header, columns, empty or duplicate
    ids, empty or multi-line answers, and, given the test set's ids, missing or unknown ones."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        return [f"{path}: file not found"]
    except (UnicodeDecodeError, csv.Error) as e:
        return [f"{path}: not a readable UTF-8 CSV file: {e}"]
    if not rows:
        return [f"{path}: empty file, expected the header {','.join(SUBMISSION_HEADER)}"]
    problems = []
    if rows[0] != SUBMISSION_HEADER:
        problems.append(f"{path}: header is {','.join(rows[0])!r}, expected {','.join(SUBMISSION_HEADER)!r}")
    seen: set[str] = set()
    for line, row in enumerate(rows[1:], start=2):
        where = f"{path}:{line}"
        if len(row) != len(SUBMISSION_HEADER):
            problems.append(f"{where}: {len(row)} columns, expected 2 (quote answers that hold commas)")
            continue
        testset_id, text = row
        if not testset_id.strip():
            problems.append(f"{where}: empty testset_id")
        elif testset_id in seen:
            problems.append(f"{where}: duplicate testset_id {testset_id!r}")
        else:
            seen.add(testset_id)
        if not text.strip():
            problems.append(f"{where}: empty answer for {testset_id!r}")
        elif "\n" in text or "\r" in text:
            problems.append(f"{where}: the answer for {testset_id!r} spans several lines")
    problems += nota_id_problems(path, [row[0] for row in rows[1:] if len(row) == len(SUBMISSION_HEADER)])
    if expected_ids is not None:
        missing, unknown = sorted(expected_ids - seen), sorted(seen - expected_ids)
        if missing:
            problems.append(f"{path}: {len(missing)} test id(s) have no row, e.g. {', '.join(missing[:5])}")
        if unknown:
            problems.append(f"{path}: {len(unknown)} id(s) are not in the test set, e.g. {', '.join(unknown[:5])}")
    return problems


def nota_id_problems(path: Path, ids: list[str]) -> list[str]:
    """Nota's evaluator takes ids of the form test0000 only: once any id looks like one (`test` and a digit),
    every id must be exactly that."""
    if not any(_NOTA_LIKE_ID.match(i) for i in ids):
        return []
    bad = [i for i in ids if not _NOTA_ID.fullmatch(i)]
    return [f"{path}: {len(bad)} testset_id(s) are not in Nota's format testXXXX (four digits, e.g. test0001): "
            f"{', '.join(map(repr, bad[:5]))}"] if bad else []


def annotation_ids(entries: Iterable[Mapping[str, Any]], task: str | None = None) -> set[str]:
    """The dialogue ids of annotation entries (of one task, when given): what a submission must cover."""
    return {entry["id"] for entry in entries if task is None or entry["task"] == task}

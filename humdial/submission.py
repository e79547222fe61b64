"""The HumDial submission package, written and checked against the test release.

    python evaluate.py --ann data/humdial/test.json --submission-dir outputs/HD-Track1       # decode + package
    python evaluate.py --validate-package outputs/HD-Track1 --test-jsonl zh/HD-Track1-T1.jsonl en/HD-Track1-T3.jsonl

The package mirrors the test release: `<lang>/HD-Track1-T<n>.jsonl`, each test dialogue copied unchanged with the
model's reply in the evaluated turn's `response_text`; Task 3 replies are also spoken, into
`<lang>/HD-Track1-T3/<dialogue_id>_<turn_id>_response.wav` (and that turn's `response_audio` names the file).
Which turn is answered: humdial.tasks.evaluated_turn.
"""
from __future__ import annotations

import copy
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

from dataset_v1 import audio_problem
from humdial.tasks import (AUDIO_KEY, EMPATHY, REPLY_KEY, TASKS, evaluated_turn, package_file_name,
                           release_language, response_wav, task_from_name, turn_id_of)
from utils import JsonlError, plain_name_problem, read_jsonl

_PLACEHOLDER = re.compile(r"\{(text|out)\}")


class PackageError(ValueError):
    """A package that cannot be written (a dialogue without a prediction, a failing TTS command ...)."""


# ---------------------------------------------------------------------------------------------- the release


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
        if "release_record" not in entry or entry.get("task") not in TASKS:
            raise PackageError(f"{entry.get('source', entry.get('id', entry.get('path')))}: not a HumDial dialogue "
                               f"converted by convert.py (no release_record, or task {entry.get('task')!r} is "
                               f"not one of {', '.join(TASKS)}): re-run convert.py on the test JSONL")
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
            task = record.get("task") if record.get("task") in TASKS else task_from_name(path)
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
    """(("file:line", dialogue object) for each non-blank line, problems: a missing file, bad lines, lines that are
    not a dialogue object)."""
    if not path.is_file():
        return [], [f"{path}: file not found"]
    objects, problems = [], []
    for where, value in read_jsonl(path):
        if isinstance(value, JsonlError):
            problems.append(str(value))
        elif not (isinstance(value, dict) and isinstance(value.get("dialogue_id"), str)
                  and isinstance(value.get("turns"), list) and all(isinstance(t, dict) for t in value["turns"])):
            problems.append(f"{where}: expected a dialogue object with a 'dialogue_id' and a list of 'turns' objects")
        else:
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



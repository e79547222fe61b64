"""HumDial Track 1 JSONL -> SALMONN annotation JSON (plus a report), validated, with a seeded train/valid split.

    python convert.py INPUT.jsonl [INPUT2.jsonl ...] -o OUT_DIR [--audio-root DIR] [--valid-ratio R]
                      [--seed S] [--task TASK] [--name train] [--skip-invalid] [--blind]

Input, one dialogue per line (only user turns have audio; `response_txt` is accepted for `response_text`):

    {"dialogue_id": "zh_0102_0001", "turns": [{"turn_id": 1, "text": "...", "emotion": "surprise",
      "split_audio_file": "task1_3/zh_0102_0001_1.wav", "response_text": "..."}, ...]}

Output entry (one per dialogue and task; audio paths relative to OUT_DIR, the dataset resolves them there):

    {"id", "task", "language", "Q": the evaluated turn's text, "text": its reply (the target),
     "eval_turn_id": its turn_id, "eval_turn_from": what decided it, "source": "file:line",
     "release_record": the input line as read (evaluate.py --submission-dir copies it into the package),
     "turns": [{"path", "transcript", "emotion", "duration", "reply"}, ..., {"path", "transcript", "emotion",
               "duration"}]}          # the turns up to the evaluated one, which has no "reply": it is the target

The evaluated turn is the one the challenge scores (humdial.tasks.evaluated_turn): the last turn for Task 1 and 2
(the user asks about the conversation); for Task 3 (empathy) the second turn whose emotion is not neutral, as
the organisers' scorer reads the labels, with the turns after it left out. An empathy dialogue with fewer than
two non-neutral turns is invalid. A blind test file without labels is read as the scorer reads it (an unlabelled
turn is not neutral) unless its replies mark the turn (the first turn without a reply after turns with one); the
report counts which rule decided (`eval_turns`).

The task comes from `--task`, else from a `task` field of the dialogue, else from the input's file or folder
name: the number right after `T` or `task`, so `HD-Track1-T1.jsonl` and `task1_3.jsonl` (task 1, 3 turns) are
emotional_trajectory, `T2`/`task2_4` emotional_reasoning, `T3`/`task3_5` empathy. The language is the
dialogue's `language` field, else the input's folder (`zh/`, `en/`, as the test release), else a `zh`/`en` part
of the dialogue id, else the text's script.
A `.json` input in the original SALMONN format (`{"annotation": [{"path", "text", "task", "Q"?}]}`) is
checked and passed through with its paths rewritten the same way.

`--blind` converts a test set without labels or targets (what the challenge hands out): `emotion`, `text` and
the replies may be absent (then "" in the output) but are still checked when present.

Invalid records are errors naming file, line, dialogue, turn and key: all of them are reported in one pass (the
first 50 in full, then a count), nothing is written and the exit code is 1. With `--skip-invalid` they are
skipped instead, each reason is counted, and the report (`OUT_DIR/<name>_report.json`, always written on
success) lists every skipped record.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from dataset_v1 import audio_problem
from humdial.tasks import REPLY_KEYS, TASKS, evaluated_turn, release_language, task_from_name, turn_id_of
from metrics import EMOTIONS, canonical_emotion
from utils import JsonlError, plain_name_problem, read_jsonl, write_json_atomic

SINGLE_CLIP_KEYS = ("path", "text", "task")
MAX_REPORTED_ERRORS = 50  # strict mode prints this many invalid records in full, then a count


class DataError(ValueError):
    """An invalid input record. `reason` is the short key counted by --skip-invalid."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class InvalidRecords(DataError):
    """Every invalid record of a strict run, reported together: one line each (the first MAX_REPORTED_ERRORS),
    then a count."""

    def __init__(self, errors: list[DataError]):
        lines = [str(e) for e in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            lines.append(f"... and {len(errors) - MAX_REPORTED_ERRORS} more")
        lines.append(f"{len(errors)} invalid record(s); nothing written (--skip-invalid skips and counts them)")
        super().__init__("invalid_records", "\n".join(lines))


@dataclass
class Stats:
    """What the summary line and the report tell."""
    dialogues: int = 0
    single_clips: int = 0
    turns: int = 0
    seconds: float = 0.0
    languages: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)
    turns_per_dialogue: Counter = field(default_factory=Counter)
    aliases: Counter = field(default_factory=Counter)  # "angry -> anger" -> count
    eval_turns: Counter = field(default_factory=Counter)  # "task: what decided the evaluated turn" -> count
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_records: list = field(default_factory=list)
    invalid: list = field(default_factory=list)  # strict mode: every DataError, raised together at the end

    def reject(self, error: DataError, skip_invalid: bool) -> None:
        """An invalid record: with --skip-invalid counted and kept for the report, else kept to be raised."""
        if not skip_invalid:
            self.invalid.append(error)
            return
        self.skipped[error.reason] += 1
        self.skipped_records.append({"reason": error.reason, "error": str(error)})

    def add(self, entry: dict) -> None:
        self.tasks[entry["task"]] += 1
        if "turns" not in entry:
            self.single_clips += 1
            return
        self.dialogues += 1
        self.eval_turns[f"{entry['task']}: {entry['eval_turn_from']}"] += 1
        self.languages[entry["language"]] += 1
        self.turns += len(entry["turns"])
        self.turns_per_dialogue[len(entry["turns"])] += 1
        for turn in entry["turns"]:
            self.seconds += turn["duration"]
            self.labels[turn["emotion"] or "(none)"] += 1

    def summary(self) -> str:
        return (f"dialogues={self.dialogues} turns={self.turns} hours={self.seconds / 3600:.3f} "
                f"single_clip_entries={self.single_clips} languages={dict(sorted(self.languages.items()))} "
                f"labels={dict(sorted(self.labels.items()))} skipped={sum(self.skipped.values())}")


# ---------------------------------------------------------------------------------------------- field checks
def require(record: dict, key: str, where: str, kind: type = str) -> object:
    """record[key], which must exist and have the given type."""
    if key not in record:
        raise DataError("missing_field", f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind):
        raise DataError("bad_field", f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value


def checked_emotion(label: str, where: str, aliases: Counter) -> str:
    """One of the seven labels; a known alias is mapped and counted, anything else is an error."""
    try:
        emotion = canonical_emotion(label)
    except ValueError as e:
        raise DataError("unknown_emotion", f"{where}: field 'emotion': unknown label {label!r}; expected one of "
                                           f"{', '.join(EMOTIONS)} (or an alias such as angry, surprised)") from e
    if emotion != label.strip().lower():
        aliases[f"{label} -> {emotion}"] += 1
    return emotion


def audio_duration(path: Path, where: str) -> float:
    """Seconds of audio in the file. Every sample is read once here: a missing, unreadable, empty, truncated or
    non-finite (NaN) file is an error naming its record, not an empty answer or a NaN loss later."""
    if not path.is_file():
        raise DataError("missing_audio", f"{where}: audio file not found: {path}")
    problem = audio_problem(path, read_samples=True)
    if problem:
        raise DataError("bad_audio", f"{where}: {problem}")
    info = sf.info(str(path))
    return info.frames / info.samplerate


@dataclass(frozen=True)
class Source:
    """Where records come from and how their paths resolve."""
    path: Path
    audio_root: Path  # relative audio paths resolve here
    out_dir: Path  # output paths are written relative to it
    task: str | None  # --task
    blind: bool = False  # a test set without emotion labels and replies

    def task_of(self, record: dict) -> object:
        """--task, else the record's `task` field, else the task the file name spells."""
        return self.task or record.get("task") or task_from_name(self.path)


def output_path(audio: Path, out_dir: Path) -> str:
    """The audio path as written into the annotation: relative to the output folder."""
    return os.path.relpath(audio.resolve(), out_dir.resolve())


# ---------------------------------------------------------------------------------------------- HumDial
def convert_turn(turn: object, index: int, where: str, source: Source, aliases: Counter) -> dict:
    """One user turn -> {path, transcript, emotion, duration, reply}."""
    turn_where = f"{where}, turn {index + 1}"
    if not isinstance(turn, dict):
        raise DataError("bad_field", f"{turn_where}: a turn must be an object, got {turn!r}")
    if "turn_id" in turn and plain_name_problem(turn["turn_id"]):
        raise DataError("bad_field", f"{turn_where}: turn_id {plain_name_problem(turn['turn_id'])}")
    audio_path = source.audio_root / require(turn, "split_audio_file", turn_where)
    converted = {
        "path": output_path(audio_path, source.out_dir),
        "transcript": optional_if_blind(turn, "text", turn_where, source.blind),
        "emotion": optional_if_blind(turn, "emotion", turn_where, source.blind),
        "duration": round(audio_duration(audio_path, turn_where), 4),
    }
    if converted["emotion"] or not source.blind:  # a blind set may leave labels empty, nothing else may
        converted["emotion"] = checked_emotion(converted["emotion"], turn_where, aliases)
    converted["reply"] = reply_of(turn, turn_where, source.blind)
    return converted


def optional_if_blind(turn: dict, key: str, where: str, blind: bool) -> str:
    """turn[key]; a blind test set may leave it out (then "")."""
    return "" if blind and key not in turn else require(turn, key, where)


def reply_of(turn: dict, where: str, blind: bool) -> str:
    """The turn's reply: `response_text`, or `response_txt` as some releases name it ("" if blind and absent)."""
    key = next((k for k in REPLY_KEYS if k in turn), None)
    if key is None:
        if blind:
            return ""
        raise DataError("missing_field", f"{where}: missing field 'response_text' (or 'response_txt')")
    return require(turn, key, where)


def check_turn_order(turns: list, where: str) -> None:
    """When every turn has a turn_id, they must increase: the trajectory's order comes from the list order."""
    ids = [t.get("turn_id") for t in turns if isinstance(t, dict)]
    if len(ids) == len(turns) and all(isinstance(i, int) for i in ids) and ids != sorted(set(ids)):
        raise DataError("bad_turn_order", f"{where}: turn_id values are not increasing: {ids}")


def convert_dialogue(record: object, location: str, source: Source, aliases: Counter) -> dict:
    """One HumDial dialogue (read at `location`, "file:line") -> one annotation entry: the turns up to the
    evaluated one, whose reply is the target."""
    if not isinstance(record, dict):
        raise DataError("bad_field", f"{location}: a line must hold a JSON object, got {type(record).__name__}")
    dialogue_id = require(record, "dialogue_id", location)
    if plain_name_problem(dialogue_id):
        raise DataError("bad_field", f"{location}: dialogue_id {plain_name_problem(dialogue_id)}")
    where = f"{location}: dialogue {dialogue_id}"
    turns = require(record, "turns", where, list)
    if not turns:
        raise DataError("empty_turns", f"{where}: 'turns' is empty")
    language = release_language(record, source.path.parent.name)
    if plain_name_problem(language):
        raise DataError("bad_field", f"{where}: language {plain_name_problem(language)}")
    check_turn_order(turns, where)
    task = source.task_of(record)
    if task not in TASKS:
        raise DataError("unknown_task", f"{where}: task {task!r} unknown or not given; pass --task "
                                        f"({', '.join(TASKS)}) or name the file after it (e.g. *T1*.jsonl)")
    local_aliases: Counter = Counter()
    converted = [convert_turn(t, i, where, source, local_aliases) for i, t in enumerate(turns)]
    try:
        target, decided_by = evaluated_turn(turns, task)
    except ValueError as e:
        raise DataError("no_eval_turn", f"{where}: no evaluated turn for task {task}: {e}") from e
    aliases.update(local_aliases)  # counted only once the whole dialogue is valid
    history = converted[:target + 1]
    return {
        "id": dialogue_id,
        "task": task,
        "language": language,
        "Q": history[-1]["transcript"],
        "text": history[-1].pop("reply"),
        "eval_turn_id": turn_id_of(turns[target], target),
        "eval_turn_from": decided_by,
        "source": location,
        "release_record": record,
        "turns": history,
    }


# ---------------------------------------------------------------------------------------------- original format
def convert_single_clip(entry: object, where: str, source: Source) -> dict:
    """An original-format entry, checked, with `path` (and `expand_wav`) rewritten relative to the output."""
    if not isinstance(entry, dict):
        raise DataError("bad_field", f"{where}: an annotation entry must be an object, got {entry!r}")
    for key in SINGLE_CLIP_KEYS:
        require(entry, key, where)
    if "Q" in entry:
        require(entry, "Q", where)
    converted = dict(entry)
    converted["path"] = output_path(checked_audio(entry["path"], where, source), source.out_dir)
    if "expand_wav" in entry:
        extra = require(entry, "expand_wav", where, list)
        converted["expand_wav"] = [output_path(checked_audio(p, where, source), source.out_dir) for p in extra]
    return converted


def checked_audio(path: object, where: str, source: Source) -> Path:
    if not isinstance(path, str):
        raise DataError("bad_field", f"{where}: audio path must be a string, got {path!r}")
    resolved = source.audio_root / path
    audio_duration(resolved, where)
    return resolved


def read_original_annotation(path: Path) -> list:
    raw = path.read_bytes()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError("not_utf8", f"{path}:{line}: not UTF-8 text: save the file as UTF-8") from e
    except json.JSONDecodeError as e:
        raise DataError("malformed_json", f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise DataError("bad_field", f"{path}: expected {{\"annotation\": [...]}} (the original SALMONN format)")
    return data["annotation"]


# ---------------------------------------------------------------------------------------------- driver
def convert_file(path: Path, source: Source, stats: Stats, skip_invalid: bool) -> list[dict]:
    """All valid entries of one input file; invalid ones go to stats.reject."""
    if path.suffix == ".jsonl":
        items = [(where, rec, "dialogue") for where, rec in read_jsonl(path)]
    else:
        items = [(f"{path}: annotation[{i}]", rec, "single") for i, rec in
                 enumerate(read_original_annotation(path))]
    entries = []
    for where, record, kind in items:
        try:
            if isinstance(record, JsonlError):
                raise DataError(record.reason, str(record))
            entry = (convert_dialogue(record, where, source, stats.aliases) if kind == "dialogue"
                     else convert_single_clip(record, where, source))
        except DataError as e:
            stats.reject(e, skip_invalid)
            continue
        entries.append(entry)
    return entries


def entry_key(entry: dict) -> tuple[str, str]:
    """(dialogue id, task); an original-format entry is keyed by its audio path."""
    return entry["id"] if "id" in entry else entry["path"], entry["task"]


def drop_duplicates(entries: list[dict], stats: Stats, skip_invalid: bool) -> list[dict]:
    """One entry per dialogue and task: a second one is invalid (stats.reject)."""
    seen: dict[tuple[str, str], str] = {}
    kept = []
    for entry in entries:
        key = entry_key(entry)
        if key in seen:
            stats.reject(DataError("duplicate", f"{entry.get('source', key[0])}: dialogue {key[0]} task "
                                                f"{key[1]} already given by {seen[key]}"), skip_invalid)
            continue
        seen[key] = entry.get("source", key[0])
        kept.append(entry)
    return kept


def split_by_dialogue(entries: list[dict], valid_ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded split on dialogue ids (all tasks of a dialogue land on the same side): never evaluate on
    training dialogues."""
    ids = sorted({entry_key(e)[0] for e in entries})
    random.Random(seed).shuffle(ids)
    num_valid = round(len(ids) * valid_ratio)
    if valid_ratio > 0 and len(ids) > 1:
        num_valid = min(max(num_valid, 1), len(ids) - 1)
    valid_ids = set(ids[:num_valid])
    train = [e for e in entries if entry_key(e)[0] not in valid_ids]
    valid = [e for e in entries if entry_key(e)[0] in valid_ids]
    return train, valid


def convert(inputs: list[Path], out_dir: Path, *, audio_root: Path | None = None, valid_ratio: float = 0.0,
            seed: int = 0, task: str | None = None, name: str = "train", skip_invalid: bool = False,
            blind: bool = False, replace: bool = False) -> Stats:
    """Converts, validates and writes `<name>.json` (+ `valid.json`) and `<name>_report.json` into out_dir.
    Unless skip_invalid, invalid records raise InvalidRecords (all of them, after reading every input); nothing
    is written then. An earlier conversion in out_dir that shares a name or a file with this one is refused, or
    with `replace` removed whole (never half kept: a new train.json beside an old valid.json)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"--valid-ratio must be in [0, 1), got {valid_ratio}")
    if plain_name_problem(name):
        raise ValueError(f"--name {plain_name_problem(name)}")
    files = [f"{name}.json", *(["valid.json"] if valid_ratio > 0 else []), f"{name}_report.json"]
    replaced = earlier_conversions(out_dir, name, files)
    if replaced and not replace:
        raise DataError("output_in_use", f"{out_dir} holds an earlier conversion ({', '.join(replaced)}) that this "
                                         "one would overwrite or mix with: choose another --out-dir, or pass "
                                         "--replace to replace that conversion whole")
    stats = Stats()
    entries: list[dict] = []
    for path in inputs:
        if not path.is_file():
            raise DataError("missing_input", f"input file not found: {path}")
        source = Source(path, audio_root or path.parent, out_dir, task, blind)
        entries += convert_file(path, source, stats, skip_invalid)
    entries = drop_duplicates(entries, stats, skip_invalid)
    if stats.invalid:
        raise InvalidRecords(stats.invalid)
    if not entries:
        raise DataError("no_entries", f"no valid entries in {', '.join(map(str, inputs))}")
    for entry in entries:
        stats.add(entry)
    train, valid = split_by_dialogue(entries, valid_ratio, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in replaced:
        (out_dir / old).unlink(missing_ok=True)
    write_json_atomic(out_dir / f"{name}.json", {"annotation": train})
    if valid_ratio > 0:
        write_json_atomic(out_dir / "valid.json", {"annotation": valid})
    sizes = {name: len(train), "valid": len(valid)} if valid_ratio > 0 else {name: len(train)}
    write_json_atomic(out_dir / f"{name}_report.json", report(inputs, stats, sizes, valid_ratio, seed))
    return stats


def earlier_conversions(out_dir: Path, name: str, files: list[str]) -> list[str]:
    """The files of every earlier conversion in out_dir that a conversion named `name` writing `files` would
    overwrite or leave mixed with its own (each conversion's report lists its annotation files), and any of
    `files` that exists without a report."""
    clashing = {f for f in files if (out_dir / f).exists()}
    for path in sorted(out_dir.glob("*_report.json")):
        try:
            owned = {f"{key}.json" for key in json.loads(path.read_text(encoding="utf-8"))["entries"]}
        except (ValueError, KeyError, TypeError):  # not a report of ours: only its own name clashes
            owned = set()
        owned.add(path.name)
        if path.name == f"{name}_report.json" or owned & set(files):
            clashing |= {f for f in owned if (out_dir / f).exists()}
    return sorted(clashing)


def report(inputs: list[Path], stats: Stats, entries: dict[str, int], valid_ratio: float, seed: int) -> dict:
    return {
        "inputs": [str(p) for p in inputs],
        "summary": stats.summary(),
        "entries": entries,
        "valid_ratio": valid_ratio,
        "seed": seed,
        "dialogues": stats.dialogues,
        "single_clip_entries": stats.single_clips,
        "turns": stats.turns,
        "hours": stats.seconds / 3600,
        "languages": dict(stats.languages),
        "tasks": dict(stats.tasks),
        "labels": dict(stats.labels),
        "turns_per_dialogue": {str(k): v for k, v in sorted(stats.turns_per_dialogue.items())},
        "label_aliases": dict(stats.aliases),
        "eval_turns": dict(sorted(stats.eval_turns.items())),
        "skipped": dict(stats.skipped),
        "skipped_records": stats.skipped_records,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path, help="HumDial .jsonl files or original-format .json")
    parser.add_argument("-o", "--out-dir", required=True, type=Path)
    parser.add_argument("--audio-root", type=Path, default=None,
                        help="relative audio paths resolve here (default: each input's folder)")
    parser.add_argument("--valid-ratio", type=float, default=0.0, help="share of dialogues held out as valid")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/valid split")
    parser.add_argument("--task", choices=list(TASKS), default=None, help="task of every input dialogue")
    parser.add_argument("--name", default="train", help="output name: <name>.json and <name>_report.json")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid records (counted in the report) instead of failing")
    parser.add_argument("--blind", action="store_true",
                        help="a test set without emotion labels, transcripts and replies (they become \"\")")
    parser.add_argument("--replace", action="store_true",
                        help="replace a conversion already in --out-dir that shares a name or file with this one, "
                             "whole (without it, such a folder is refused)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = convert(args.inputs, args.out_dir, audio_root=args.audio_root, valid_ratio=args.valid_ratio,
                        seed=args.seed, task=args.task, name=args.name, skip_invalid=args.skip_invalid,
                        blind=args.blind, replace=args.replace)
    except (DataError, ValueError) as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 1
    for mapping, count in sorted(stats.aliases.items()):
        print(f"label alias: {mapping} ({count}x)")
    for rule, count in sorted(stats.eval_turns.items()):
        if rule.startswith("empathy"):
            print(f"evaluated turn ({rule}): {count} dialogue(s)")
    for reason, count in sorted(stats.skipped.items()):
        print(f"skipped {count} record(s): {reason}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

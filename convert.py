"""HumDial Track 1 JSONL -> SALMONN annotation JSON (plus a report), validated, with a seeded train/valid split.

    python convert.py INPUT.jsonl [INPUT2.jsonl ...] -o OUT_DIR [--audio-root DIR] [--valid-ratio R]
                      [--seed S] [--task TASK] [--name train] [--skip-invalid] [--blind]

Input, one dialogue per line (only user turns have audio; the last turn asks about the conversation and its
reply is the target; `response_txt` is accepted for `response_text`):

    {"dialogue_id": "zh_0102_0001", "turns": [{"turn_id": 1, "text": "...", "emotion": "surprise",
      "split_audio_file": "task1_3/zh_0102_0001_1.wav", "response_text": "..."}, ...]}

Output entry (one per dialogue and task; audio paths relative to OUT_DIR, the dataset resolves them there):

    {"id", "task", "language", "Q": last user text, "text": target (last reply), "source": "file:line",
     "turns": [{"path", "transcript", "emotion", "duration", "reply"}, ..., {"path", "transcript", "emotion",
               "duration"}]}          # the last turn has no "reply": that reply is the target

The task comes from `--task`, else from a `task` field of the dialogue, else from the input's file or folder
name (`T1`/`task1` -> emotional_trajectory, `T2` -> emotional_reasoning, `T3` -> empathy).
A `.json` input in the original SALMONN format (`{"annotation": [{"path", "text", "task", "Q"?}]}`) is
checked and passed through with its paths rewritten the same way.

`--blind` converts a test set without labels or targets (what the challenge hands out): `emotion`, `text` and
the replies may be absent (then "" in the output) but are still checked when present.

Any invalid record is an error naming file, line, dialogue, turn and key; nothing is written and the exit code
is 1. With `--skip-invalid` the record is skipped instead, each reason is counted, and the report
(`OUT_DIR/<name>_report.json`, always written on success) lists every skipped record.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import soundfile as sf

from labels import EMOTIONS, TASK_BY_NUMBER, TASKS, canonical_emotion, text_language

REPLY_KEYS = ("response_text", "response_txt")
SINGLE_CLIP_KEYS = ("path", "text", "task")
_TASK_IN_NAME = re.compile(r"(?:^|[^a-z0-9])t(?:ask)?[-_]?([123])(?![0-9])", re.IGNORECASE)


class DataError(ValueError):
    """An invalid input record. `reason` is the short key counted by --skip-invalid."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


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
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_records: list = field(default_factory=list)

    def skip(self, error: DataError) -> None:
        """--skip-invalid: count the record's reason and keep its message for the report."""
        self.skipped[error.reason] += 1
        self.skipped_records.append({"reason": error.reason, "error": str(error)})

    def add(self, entry: dict) -> None:
        self.tasks[entry["task"]] += 1
        if "turns" not in entry:
            self.single_clips += 1
            return
        self.dialogues += 1
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
    """Seconds of audio in the file, read from its header; missing, unreadable or empty files are errors."""
    if not path.is_file():
        raise DataError("missing_audio", f"{where}: audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise DataError("unreadable_audio", f"{where}: cannot read audio {path}: {e}") from e
    if info.frames == 0:
        raise DataError("empty_audio", f"{where}: audio file has no samples: {path}")
    return info.frames / info.samplerate


def dialogue_language(record: dict, dialogue_id: str, texts: list[str]) -> str:
    """`language` field, else the id prefix (`zh_...`, `en_...`), else zh when the text has CJK characters."""
    if isinstance(record.get("language"), str):
        return record["language"]
    prefix = dialogue_id.split("_", 1)[0].lower()
    if prefix in ("zh", "en"):
        return prefix
    return text_language(" ".join(texts))


def task_from_name(path: Path) -> str | None:
    """The task a file or folder name spells (`HD-Track1-T2.jsonl`, `task1_train.jsonl`), if any."""
    for name in (path.stem, path.parent.name):
        match = _TASK_IN_NAME.search(name)
        if match:
            return TASK_BY_NUMBER[match.group(1)]
    return None


@dataclass(frozen=True)
class Source:
    """Where records come from and how their paths resolve."""
    path: Path
    audio_root: Path  # relative audio paths resolve here
    out_dir: Path  # output paths are written relative to it
    task: str | None  # --task or the task the file name spells
    blind: bool = False  # a test set without emotion labels and replies


def output_path(audio: Path, out_dir: Path) -> str:
    """The audio path as written into the annotation: relative to the output folder."""
    return os.path.relpath(audio.resolve(), out_dir.resolve())


# ---------------------------------------------------------------------------------------------- HumDial
def convert_turn(turn: object, index: int, is_last: bool, where: str, source: Source,
                 aliases: Counter) -> dict:
    """One user turn -> {path, transcript, emotion, duration[, reply]} (the last turn's reply is the target)."""
    turn_where = f"{where}, turn {index + 1}"
    if not isinstance(turn, dict):
        raise DataError("bad_field", f"{turn_where}: a turn must be an object, got {turn!r}")
    audio_path = source.audio_root / require(turn, "split_audio_file", turn_where)
    converted = {
        "path": output_path(audio_path, source.out_dir),
        "transcript": optional_if_blind(turn, "text", turn_where, source.blind),
        "emotion": optional_if_blind(turn, "emotion", turn_where, source.blind),
        "duration": round(audio_duration(audio_path, turn_where), 4),
    }
    if converted["emotion"] or not source.blind:  # a blind set may leave labels empty, nothing else may
        converted["emotion"] = checked_emotion(converted["emotion"], turn_where, aliases)
    reply = reply_of(turn, turn_where, source.blind)
    if not is_last:
        converted["reply"] = reply
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
    """One HumDial dialogue (read at `location`, "file:line") -> one annotation entry."""
    if not isinstance(record, dict):
        raise DataError("bad_field", f"{location}: a line must hold a JSON object, got {type(record).__name__}")
    dialogue_id = require(record, "dialogue_id", location)
    if not dialogue_id.strip():
        raise DataError("bad_field", f"{location}: empty dialogue_id")
    where = f"{location}: dialogue {dialogue_id}"
    turns = require(record, "turns", where, list)
    if not turns:
        raise DataError("empty_turns", f"{where}: 'turns' is empty")
    check_turn_order(turns, where)
    task = source.task or record.get("task")
    if task not in TASKS:
        raise DataError("unknown_task", f"{where}: task {task!r} unknown or not given; pass --task "
                                        f"({', '.join(TASKS)}) or name the file after it (e.g. *T1*.jsonl)")
    local_aliases: Counter = Counter()
    converted = [convert_turn(t, i, i == len(turns) - 1, where, source, local_aliases)
                 for i, t in enumerate(turns)]
    aliases.update(local_aliases)  # counted only once the whole dialogue is valid
    return {
        "id": dialogue_id,
        "task": task,
        "language": dialogue_language(record, dialogue_id, [t["transcript"] for t in converted]),
        "Q": converted[-1]["transcript"],
        "text": reply_of(turns[-1], f"{where}, turn {len(turns)}", source.blind),
        "source": location,
        "turns": converted,
    }


def read_jsonl(path: Path) -> list[tuple[str, object]]:
    """(where, parsed record or the DataError of a malformed line) for each non-blank line."""
    records: list[tuple[str, object]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                records.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                records.append((where, DataError("malformed_json", f"{where}: malformed JSON: {e.msg} "
                                                                   f"(column {e.colno})")))
    return records


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
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError("malformed_json", f"{path}:{e.lineno}: malformed JSON: {e.msg} "
                                              f"(column {e.colno})") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise DataError("bad_field", f"{path}: expected {{\"annotation\": [...]}} (the original SALMONN format)")
    return data["annotation"]


# ---------------------------------------------------------------------------------------------- driver
def convert_file(path: Path, source: Source, stats: Stats, skip_invalid: bool) -> list[dict]:
    """All valid entries of one input file; invalid ones raise, or are counted and skipped."""
    if path.suffix == ".jsonl":
        items = [(where, rec, "dialogue") for where, rec in read_jsonl(path)]
    else:
        items = [(f"{path}: annotation[{i}]", rec, "single") for i, rec in
                 enumerate(read_original_annotation(path))]
    entries = []
    for where, record, kind in items:
        try:
            if isinstance(record, DataError):
                raise record
            entry = (convert_dialogue(record, where, source, stats.aliases) if kind == "dialogue"
                     else convert_single_clip(record, where, source))
        except DataError as e:
            if not skip_invalid:
                raise
            stats.skip(e)
            continue
        entries.append(entry)
    return entries


def entry_key(entry: dict) -> tuple[str, str]:
    """(dialogue id, task); an original-format entry is keyed by its audio path."""
    return entry["id"] if "id" in entry else entry["path"], entry["task"]


def drop_duplicates(entries: list[dict], stats: Stats, skip_invalid: bool) -> list[dict]:
    """One entry per dialogue and task: a second one is an error (or skipped and counted)."""
    seen: dict[tuple[str, str], str] = {}
    kept = []
    for entry in entries:
        key = entry_key(entry)
        if key in seen:
            error = DataError("duplicate", f"{entry.get('source', key[0])}: dialogue {key[0]} task "
                                           f"{key[1]} already given by {seen[key]}")
            if not skip_invalid:
                raise error
            stats.skip(error)
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


def write_json_atomic(path: Path, data: object) -> None:
    """Temp file in the same folder, then rename: a reader never sees a partial file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def convert(inputs: list[Path], out_dir: Path, *, audio_root: Path | None = None, valid_ratio: float = 0.0,
            seed: int = 0, task: str | None = None, name: str = "train", skip_invalid: bool = False,
            blind: bool = False) -> Stats:
    """Converts, validates and writes `<name>.json` (+ `valid.json`) and `<name>_report.json` into out_dir.
    Raises DataError on the first invalid record unless skip_invalid; nothing is written then."""
    if task is not None and task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if not 0.0 <= valid_ratio < 1.0:
        raise ValueError(f"--valid-ratio must be in [0, 1), got {valid_ratio}")
    stats = Stats()
    entries: list[dict] = []
    for path in inputs:
        if not path.is_file():
            raise DataError("missing_input", f"input file not found: {path}")
        source = Source(path, audio_root or path.parent, out_dir, task or task_from_name(path), blind)
        entries += convert_file(path, source, stats, skip_invalid)
    entries = drop_duplicates(entries, stats, skip_invalid)
    if not entries:
        raise DataError("no_entries", f"no valid entries in {', '.join(map(str, inputs))}")
    for entry in entries:
        stats.add(entry)
    train, valid = split_by_dialogue(entries, valid_ratio, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{name}.json", {"annotation": train})
    if valid_ratio > 0:
        write_json_atomic(out_dir / "valid.json", {"annotation": valid})
    sizes = {name: len(train), "valid": len(valid)} if valid_ratio > 0 else {name: len(train)}
    write_json_atomic(out_dir / f"{name}_report.json", report(inputs, stats, sizes, valid_ratio, seed))
    return stats


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
    parser.add_argument("--task", choices=TASKS, default=None, help="task of every input dialogue")
    parser.add_argument("--name", default="train", help="output name: <name>.json and <name>_report.json")
    parser.add_argument("--skip-invalid", action="store_true",
                        help="skip invalid records (counted in the report) instead of failing")
    parser.add_argument("--blind", action="store_true",
                        help="a test set without emotion labels, transcripts and replies (they become \"\")")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        stats = convert(args.inputs, args.out_dir, audio_root=args.audio_root, valid_ratio=args.valid_ratio,
                        seed=args.seed, task=args.task, name=args.name, skip_invalid=args.skip_invalid,
                        blind=args.blind)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for mapping, count in sorted(stats.aliases.items()):
        print(f"label alias: {mapping} ({count}x)")
    for reason, count in sorted(stats.skipped.items()):
        print(f"skipped {count} record(s): {reason}")
    print(stats.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())

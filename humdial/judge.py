"""The HumDial LLM-judge protocol: Tasks 1 and 2 and the text part of Task 3, scored by an LLM served behind an
OpenAI-compatible chat-completions endpoint (the challenge serves Qwen3-Omni-30B-A3B-Instruct with vLLM).

The judge sees the conversation with the gold emotion tag of every user turn, the earlier assistant replies, the
final user turn and the answer under evaluation (prompts/judge_prompts.json), and scores each dimension of the task
(the task table's judge columns, humdial.tasks). Replies are parsed leniently (JSON, JSON in prose or code
fences, `Name: 5` lines) and mapped onto the official scale; a dimension that cannot be read scores the minimum
and is counted, never dropped. Every reply is appended to a JSONL cache as it arrives, so an interrupted run
resumes without asking again.

The records are those of inference.decode (predictions.jsonl); their transcripts come from the annotation file,
joined by (id, task).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import openai
from openai.types.chat import ChatCompletion
from tqdm import tqdm

from config import section_defaults
from dataset_v1 import read_annotation
from humdial.tasks import HUMAN_RATED, LANGUAGES, TASKS
from utils import JsonlError, read_jsonl, write_json_atomic


class JudgeError(ValueError):
    """Judging cannot go on: a bad input file or prompt file, or a judge that keeps failing."""


PLACEHOLDERS = ("{dialogue}", "{final_turn}", "{answer}")
PLACEHOLDER = re.compile(r"\{(dialogue|final_turn|answer)\}")
DEFAULT_CACHE_NAME = "judge_cache.jsonl"
SCORES_NAME = "judge_scores.json"


# ---------------------------------------------------------------------------------------------- prompts
def load_prompts(path: str | os.PathLike) -> dict[str, str]:
    """`{"system": ..., <task>: template}` from a JSON file whose templates are strings or lists of lines; each
    template must hold the three placeholders and name every dimension of its task."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"judge prompt file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise JudgeError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from e
    expected = {"system", *TASKS}
    if not isinstance(raw, dict) or set(raw) != expected:
        got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise JudgeError(f"{path}: expected the keys {', '.join(sorted(expected))}, got {got}")
    prompts = {key: "\n".join(value) if isinstance(value, list) else value for key, value in raw.items()}
    for task, rubric in TASKS.items():
        missing = [p for p in PLACEHOLDERS if p not in prompts[task]]
        missing += [d for d in rubric.judge_dimensions if d not in prompts[task]]
        if missing:
            raise JudgeError(f"{path}: the `{task}` template lacks {', '.join(missing)}")
    return prompts


def dialogue_text(turns: list[Mapping[str, Any]]) -> str:
    """The turns before the last: each user transcript behind its gold tag, then the assistant's reply."""
    lines = []
    for n, turn in enumerate(turns[:-1], start=1):
        lines += [f"Turn {n}", user_line(turn), f"Assistant: {turn.get('reply', '(no reply recorded)')}"]
    return "\n".join(lines) or "(no earlier turns)"


def user_line(turn: Mapping[str, Any]) -> str:
    return f"User [{turn['emotion']}]: {turn['transcript']}"


def build_messages(record: Mapping[str, Any], entry: Mapping[str, Any], prompts: Mapping[str, str]
                   ) -> list[dict[str, str]]:
    """The chat messages that ask the judge to grade one answer (placeholders filled in one pass, so a transcript
    or an answer that happens to contain `{answer}` stays as it is)."""
    values = {"dialogue": dialogue_text(entry["turns"]), "final_turn": user_line(entry["turns"][-1]),
              "answer": record["prediction"]}
    text = PLACEHOLDER.sub(lambda m: values[m.group(1)], prompts[record["task"]])
    return [{"role": "system", "content": prompts["system"]}, {"role": "user", "content": text}]


def judgment_key(model: str, task: str, messages: list[dict[str, str]]) -> str:
    """The cache key: what was asked of which judge."""
    blob = json.dumps({"model": model, "task": task, "messages": messages}, ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- parsing
THINKING = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_scores(reply: str, task: str) -> dict[str, int | None]:
    """Each dimension of the task -> its score on the official scale, or None when the reply does not give it.

    The last JSON object that names a dimension wins (also inside code fences or prose, or nested under a key
    such as "scores"); dimensions it lacks are looked for in `Name: 5` lines (last one wins)."""
    rubric = TASKS[task]
    text = THINKING.sub("", reply or "")
    found: dict[str, float] = {}
    for obj in json_objects(text):
        values = {d: v for d in rubric.judge_dimensions if (v := dimension_value(obj, d)) is not None}
        if values:
            found = values
    for dimension in rubric.judge_dimensions:
        if dimension not in found and (value := line_value(text, dimension)) is not None:
            found[dimension] = value
    return {d: to_scale(found[d], rubric.judge_scale) if d in found else None for d in rubric.judge_dimensions}


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every top-level JSON object in the text (prose and code fences around it are skipped), in order; where an
    object does not decode, the objects inside it are still found."""
    decoder = json.JSONDecoder()
    objects = []
    start = text.find("{")
    while start != -1:
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        objects.append(obj)
        start = text.find("{", end)
    return objects


def dimension_value(obj: Mapping[str, Any], dimension: str) -> float | None:
    """The number a JSON object gives a dimension (key matched ignoring case, spaces and underscores; a nested
    object such as {"scores": {...}} or {"Accuracy_Completeness": {"score": 5}} is looked into)."""
    want = normal_name(dimension)
    for key, value in obj.items():
        if normal_name(str(key)) == want:
            if isinstance(value, dict):
                value = value.get("score")
            return number_in(value)
    for value in obj.values():
        if isinstance(value, dict) and (nested := dimension_value(value, dimension)) is not None:
            return nested
    return None


def line_value(text: str, dimension: str) -> float | None:
    """The number after the last `Dimension: n` (or `**Dimension** = n`, spaces for underscores) in the text."""
    name = r"[\s_-]*".join(map(re.escape, dimension.split("_")))
    matches = re.findall(rf"{name}\W{{0,6}}?[:=：][\s*\[\"']*(-?\d+(?:\.\d+)?)", text, flags=re.IGNORECASE)
    return float(matches[-1]) if matches else None


def normal_name(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).lower()


def number_in(value: Any) -> float | None:
    """A score given as a number or as text that starts with one ("5", "5 - excellent")."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and (match := NUMBER.match(value.strip())):
        return float(match.group())
    return None


def to_scale(value: float, scale: tuple[int, ...]) -> int:
    """The nearest allowed score (out-of-range values clip to the ends); a tie goes to the lower score, so a
    score the judge did not commit to is never rounded up."""
    return min(scale, key=lambda s: (abs(s - value), s))


# ---------------------------------------------------------------------------------------------- cache
class JudgmentCache:
    """Judge replies by key, in a JSONL file that grows by one flushed line per judgment. A last line cut short by
    a killed run is dropped (and counted in `dropped`); a broken line elsewhere is an error."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.replies: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        offset = 0
        for number, line in enumerate(lines, start=1):
            last = number == len(lines)
            try:
                if line.strip():
                    entry = json.loads(line)
                    if not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                            and isinstance(entry.get("reply"), str)):
                        raise ValueError("expected an object with a string key and reply")
                    self.replies[entry["key"]] = entry
            except ValueError as e:  # also malformed JSON and bytes that are not UTF-8
                if not last:
                    raise JudgeError(f"{self.path}:{number}: not a judgment line ({e}); fix or remove the line") from e
                self._drop_tail(offset, number)
                return
            offset += len(line) + 1
        if data and not data.endswith(b"\n"):  # a whole last line without its newline
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def _drop_tail(self, offset: int, number: int) -> None:
        with open(self.path, "r+b") as f:
            f.truncate(offset)
        self.dropped += 1
        print(f"warning: {self.path}:{number}: last line cut short (an interrupted run?); dropped it, that "
              "judgment is asked again", file=sys.stderr)

    def append(self, entry: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.replies[entry["key"]] = entry


# ---------------------------------------------------------------------------------------------- asking
def judge_settings(judge_cfg: Mapping[str, Any] | None) -> dict[str, Any]:
    """The `judge:` section (defaults filled), checked for what a run needs."""
    cfg = section_defaults("judge", {} if judge_cfg is None else dict(judge_cfg))
    for key in ("base_url", "model"):
        if not cfg[key]:
            flag = "--judge-url" if key == "base_url" else "--judge-model"
            raise JudgeError(f"judge.{key} is empty: pass {flag} or set judge.{key} in the config")
    if cfg["concurrency"] < 1:
        raise JudgeError(f"judge.concurrency must be at least 1, got {cfg['concurrency']}")
    return cfg


def make_client(cfg: Mapping[str, Any]) -> openai.OpenAI:
    """An OpenAI-compatible client; its own retries (exponential back-off) cover connection errors, timeouts,
    408/409/429 and 5xx."""
    api_key = "EMPTY"  # what vLLM accepts when served without --api-key
    if cfg["api_key_env"]:
        if cfg["api_key_env"] not in os.environ:
            raise JudgeError(f"judge.api_key_env names {cfg['api_key_env']}, which is not set in the environment")
        api_key = os.environ[cfg["api_key_env"]]
    return openai.OpenAI(base_url=cfg["base_url"], api_key=api_key, timeout=cfg["timeout"],
                         max_retries=cfg["max_retries"])


def ask(client: openai.OpenAI, cfg: Mapping[str, Any], messages: list[dict[str, str]], what: str
        ) -> tuple[str, str | None]:
    """The judge's reply text and finish reason; JudgeError once the client's retries are spent."""
    try:
        response = client.chat.completions.create(
            model=cfg["model"], messages=messages, temperature=cfg["temperature"], top_p=cfg["top_p"],
            max_tokens=cfg["max_tokens"], extra_body={"top_k": cfg["top_k"]})
    except openai.APIStatusError as e:
        raise JudgeError(f"judge {cfg['base_url']} answered HTTP {e.status_code} for {what} "
                         f"(after up to {cfg['max_retries']} retries): {e.message}") from e
    except openai.APIConnectionError as e:  # also timeouts
        raise JudgeError(f"judge {cfg['base_url']} unreachable for {what} after {cfg['max_retries']} retries: "
                         f"{e}") from e
    except ValueError as e:  # a JSON content type with a body that is not JSON
        raise JudgeError(f"judge {cfg['base_url']} sent a body that is not JSON for {what}: {e}") from e
    if not isinstance(response, ChatCompletion):  # an HTML error page, a binary body: the client hands it back as is
        raise JudgeError(f"judge {cfg['base_url']} sent no chat completion for {what} but "
                         f"{str(response)[:80]!r}: is base_url the /v1 of an OpenAI-compatible server?")
    if not response.choices or response.choices[0].message is None:
        raise JudgeError(f"judge {cfg['base_url']} returned no choices for {what}")
    choice = response.choices[0]
    if not isinstance(choice.message.content, (str, type(None))):
        raise JudgeError(f"judge {cfg['base_url']} returned a message without text for {what}")
    return choice.message.content or "", choice.finish_reason


# ---------------------------------------------------------------------------------------------- judging
@dataclass
class Item:
    record: dict[str, Any]
    messages: list[dict[str, str]]
    key: str


def judge_items(records: list[dict[str, Any]], entries: list[dict[str, Any]], prompts: Mapping[str, str],
                model: str, ann_path: str | os.PathLike) -> tuple[list[Item], dict[str, int]]:
    """One item per record of a judged task, joined to its annotation entry by (id, task); and the count of
    records skipped per task that has no rubric (e.g. asr)."""
    by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        if "turns" in entry:
            by_key[str(entry["id"]), entry["task"]] = entry
    items, skipped = [], {}
    for record in records:
        task = record["task"]
        if task not in TASKS:
            skipped[task] = skipped.get(task, 0) + 1
            continue
        entry = by_key.get((str(record["id"]), task))
        if entry is None:
            raise JudgeError(f"{ann_path}: no dialogue with id {record['id']!r} and task {task!r} (needed for its "
                             "transcripts and gold emotions): is it the annotation these predictions came from?")
        check_judgeable(entry, ann_path)
        messages = build_messages(record, entry, prompts)
        items.append(Item(record, messages, judgment_key(model, task, messages)))
    return items, skipped


def check_judgeable(entry: Mapping[str, Any], ann_path: str | os.PathLike) -> None:
    """Every turn needs its transcript and gold emotion: a blind test set has neither."""
    for n, turn in enumerate(entry["turns"], start=1):
        for key in ("transcript", "emotion"):
            if not str(turn.get(key, "")).strip():
                raise JudgeError(f"{ann_path}: dialogue {entry['id']}, turn {n}: no {key!r} (a blind test set?); "
                                 "the judge needs every turn's transcript and gold emotion")


def judge_all(items: list[Item], cfg: Mapping[str, Any], cache: JudgmentCache, show_progress: bool = True
              ) -> list[dict[str, Any]]:
    """The cache entry of every item, asking the judge (judge.concurrency at a time) only for those without a final
    reply: none cached, or one that does not give every score (recorded, but asked again on a rerun: the judge
    may have been fixed since). Each reply is written to the cache as it arrives; on a failure the pending
    requests are cancelled."""
    todo = list({item.key: item for item in items
                 if not is_final(cache.replies.get(item.key), item.record["task"])}.values())
    if todo:
        client = make_client(cfg)
        pool = ThreadPoolExecutor(max_workers=cfg["concurrency"])
        try:
            futures: dict[Future, Item] = {
                pool.submit(ask, client, cfg, item.messages, f"{item.record['task']} {item.record['id']}"): item
                for item in todo}
            for future in tqdm(as_completed(futures), total=len(futures), desc="judge", unit="answer",
                               disable=not show_progress, dynamic_ncols=True):
                item = futures[future]
                reply, finish_reason = future.result()
                cache.append({"key": item.key, "model": cfg["model"], "task": item.record["task"],
                              "id": item.record["id"], "language": item.record["language"], "reply": reply,
                              "finish_reason": finish_reason})
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return [cache.replies[item.key] for item in items]


def is_final(entry: Mapping[str, Any] | None, task: str) -> bool:
    """A cached reply that gives every dimension of the task a score: one that does not is asked again."""
    return entry is not None and None not in parse_scores(entry["reply"], task).values()


def judgments(items: list[Item], cached: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per item: id, task, language, the score of every dimension (minimum where unreadable) and the dimensions
    the reply did not give."""
    out = []
    for item, entry in zip(items, cached):
        rubric = TASKS[item.record["task"]]
        parsed = parse_scores(entry["reply"], item.record["task"])
        out.append({"id": item.record["id"], "task": item.record["task"], "language": item.record["language"],
                    "scores": {d: rubric.judge_scale[0] if v is None else v for d, v in parsed.items()},
                    "unparsable": [d for d, v in parsed.items() if v is None], "key": item.key})
    return out


# ---------------------------------------------------------------------------------------------- summary
def summarize(judged: list[dict[str, Any]]) -> dict[str, Any]:
    """Per `task/language`: the count, the mean of each dimension and the unparsable count of each dimension;
    per language: the partial challenge score."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for j in judged:
        groups.setdefault(f"{j['task']}/{j['language']}", []).append(j)
    scores, unparsable = {}, {}
    for group, members in sorted(groups.items()):
        dims = TASKS[members[0]["task"]].judge_dimensions
        scores[group] = {d: sum(m["scores"][d] for m in members) / len(members) for d in dims}
        unparsable[group] = {d: sum(d in m["unparsable"] for m in members) for d in dims}
    return {"counts": {g: len(m) for g, m in sorted(groups.items())}, "scores": scores, "unparsable": unparsable,
            "challenge": challenge_scores(scores)}


def challenge_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per language: each part of the ranking (0.2 T1 + 0.2 T2 + 0.1 T3 text + 0.25 T3 vocal + 0.25 T3
    naturalness) with its score (mean of the task's dimensions, 1-5) or why it is missing, the weighted sum of what
    was measured and the weight that covers. The mean over zh and en is given when both cover the same parts."""
    out: dict[str, Any] = {}
    for language in sorted({group.split("/")[1] for group in scores}):
        parts = []
        for task, weight in ((name, task.weight) for name, task in TASKS.items()):
            dims = scores.get(f"{task}/{language}")
            parts.append({"part": task, "weight": weight,
                          "score": sum(dims.values()) / len(dims) if dims else None,
                          "status": "judged" if dims else "no predictions"})
        parts += [{"part": part, "weight": weight, "score": None, "status": "human-rated"}
                  for part, weight in HUMAN_RATED.items()]
        measured = [p for p in parts if p["score"] is not None]
        out[language] = {"parts": parts, "weighted_sum": sum(p["weight"] * p["score"] for p in measured),
                         "weight_covered": round(sum(p["weight"] for p in measured), 6)}
    out["mean"] = languages_mean(out)
    return out


def languages_mean(per_language: Mapping[str, Any]) -> dict[str, Any]:
    """The challenge's average over zh and en, or why there is none."""
    missing = [lang for lang in LANGUAGES if lang not in per_language]
    if missing:
        return {"weighted_sum": None, "why": f"no judged predictions in {', '.join(missing)}"}
    covered = {lang: [p["part"] for p in per_language[lang]["parts"] if p["score"] is not None]
               for lang in LANGUAGES}
    if len({tuple(parts) for parts in covered.values()}) > 1:
        return {"weighted_sum": None, "why": f"the languages cover different parts: {covered}"}
    return {"weighted_sum": sum(per_language[lang]["weighted_sum"] for lang in LANGUAGES) / 2,
            "weight_covered": per_language[LANGUAGES[0]]["weight_covered"]}


def format_judge_table(summary: Mapping[str, Any]) -> str:
    """The means as an aligned table (task, language, n, dimension, mean, unparsable), then the challenge score."""
    rows = [("task", "lang", "n", "dimension", "mean", "unparsable")]
    for group, dims in summary["scores"].items():
        task, language = group.split("/")
        for dim, mean in dims.items():
            rows.append((task, language, str(summary["counts"][group]), dim, f"{mean:.2f}",
                         str(summary["unparsable"][group][dim])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    challenge = summary["challenge"]
    for language in [lang for lang in challenge if lang != "mean"]:
        c = challenge[language]
        missing = ", ".join(f"{p['part']} {p['weight']:g} ({p['status']})" for p in c["parts"] if p["score"] is None)
        lines.append(f"challenge {language}: {c['weighted_sum']:.3f} of at most {5 * c['weight_covered']:g} (weight "
                     f"{c['weight_covered']:g} of 1 measured, 1-5 scale); not measured: {missing}")
    mean = challenge["mean"]
    lines.append(f"challenge mean over zh, en: {mean['weighted_sum']:.3f} of at most {5 * mean['weight_covered']:g}"
                 if mean["weighted_sum"] is not None else f"challenge mean over zh, en: none ({mean['why']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- files
def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a predictions.jsonl, each checked for the keys judging needs."""
    path = Path(path)
    if not path.is_file():
        raise JudgeError(f"predictions file not found: {path}")
    records = []
    for where, record in read_jsonl(path):
        if isinstance(record, JsonlError):
            raise JudgeError(str(record))
        if not isinstance(record, dict):
            raise JudgeError(f"{where}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in ("id", "task", "language", "prediction") if k not in record]
        if missing:
            raise JudgeError(f"{where}: missing key(s) {', '.join(missing)}")
        if not isinstance(record["prediction"], str):
            raise JudgeError(f"{where}: `prediction` must be a string, got {record['prediction']!r}")
        records.append(record)
    return records


def judge_records(records: list[dict[str, Any]], ann_path: str | os.PathLike, judge_cfg: Mapping[str, Any] | None,
                  out_dir: str | os.PathLike, show_progress: bool = True) -> dict[str, Any]:
    """Judge decoded records against their annotation file; writes <out_dir>/judge_scores.json (the summary, the
    settings and every judgment) and returns it. The cache defaults to <out_dir>/judge_cache.jsonl."""
    cfg = judge_settings(judge_cfg)
    out_dir = Path(out_dir)
    prompts = load_prompts(cfg["prompt_path"])
    items, skipped = judge_items(records, read_annotation(ann_path, check_audio=False), prompts, cfg["model"], ann_path)
    if not items:
        raise JudgeError(f"nothing to judge: no record of the tasks {', '.join(TASKS)} "
                         f"(tasks seen: {', '.join(sorted(skipped)) or 'none'})")
    cache = JudgmentCache(cfg["cache_path"] or out_dir / DEFAULT_CACHE_NAME)
    reused = sum(is_final(cache.replies.get(item.key), item.record["task"]) for item in items)
    judged = judgments(items, judge_all(items, cfg, cache, show_progress))
    summary = {"annotation": str(ann_path), "judge": cfg,
               "num_judged": len(judged), "skipped_tasks": skipped,
               "cache": {"path": str(cache.path), "reused": reused, "asked": len(judged) - reused,
                         "dropped_cut_lines": cache.dropped},
               **summarize(judged), "judgments": judged}
    write_json_atomic(out_dir / SCORES_NAME, summary)
    return summary


def judge_predictions(predictions_path: str | os.PathLike, ann_path: str | os.PathLike,
                      judge_cfg: Mapping[str, Any] | None, show_progress: bool = True) -> dict[str, Any]:
    """judge_records on an existing predictions.jsonl; judge_scores.json goes next to it."""
    return judge_records(read_predictions(predictions_path), ann_path, judge_cfg, Path(predictions_path).parent,
                         show_progress)

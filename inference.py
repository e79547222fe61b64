"""Inference, below the scripts: the config and model for answering, generation settings, streamed answers, and
batched decoding into records together with the files they are written to.

cli_inference.py, evaluate.py, web_demo.py, the runner (validation decoding, `run.evaluate`) and the benchmarks
all go through here, so a decode gives the same records and files whichever script runs it.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm
from transformers import TextIteratorStreamer

from config import ConfigError, add_config_arguments, config_to_dict, load_config
from dataset_v1 import AudioError, audio_paths, audio_seconds, collate, load_feature_extractor, make_batch
from metrics import Scorer, group_records, text_language
from models.salmonn import SALMONN
from utils import (JsonlError, atomic_file, autocast, autocast_dtype, code_version, file_fingerprint, read_jsonl,
                   resolve_device, seed_everything, write_json_atomic)

log = logging.getLogger("salmonn.inference")

DEFAULT_CFG_PATHS = ["configs/demo.yaml"]

# generate: keys settable from the command line (HF GenerationConfig names) and their types.
GENERATION_FLAGS: dict[str, type] = {
    "max_new_tokens": int, "num_beams": int, "temperature": float, "top_p": float,
    "repetition_penalty": float, "length_penalty": float, "min_length": int,
}
SAMPLING_ONLY = ("temperature", "top_p")
PARTIAL_PREDICTIONS = "predictions.partial.jsonl"  # written as a decode goes; predictions.jsonl when it is done
DECODE_STATE = "decode.json"  # what the decode in a folder is: annotation, checkpoint, generation settings


# ---------------------------------------------------------------------------------------------- config and model
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--cfg-path/--options/--device/--lora-scaling and one flag per generation setting."""
    add_config_arguments(parser, "config file(s), merged in order (a model config, then e.g. "
                                 "configs/decode_config.yaml); default: " + " + ".join(DEFAULT_CFG_PATHS))
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda | cuda:N")
    parser.add_argument("--lora-scaling", type=float, default=None,
                        help="inference LoRA scaling (default alpha/rank); lower it to bring back abilities the "
                             "fine-tune suppressed")
    group = parser.add_argument_group("generation (override the config's generate: section)")
    for key, kind in GENERATION_FLAGS.items():
        group.add_argument("--" + key.replace("_", "-"), dest=key, type=kind, default=None)
    group.add_argument("--do-sample", dest="do_sample", action=argparse.BooleanOptionalAction, default=None)


def load_inference_config(cfg_paths: list[str] | None, options: list[str]) -> DictConfig:
    """The merged, validated config of one or more YAML files; it must describe a model."""
    paths = cfg_paths or DEFAULT_CFG_PATHS
    cfg = load_config(paths, options)
    if "model" not in cfg:
        raise ConfigError(f"no `model:` section in {' + '.join(paths)}: add the model's config, e.g. "
                          f"--cfg-path configs/demo.yaml --cfg-path {paths[-1]}")
    return cfg


def generation_settings(generate_cfg: Mapping[str, Any], args: argparse.Namespace | None = None) -> dict[str, Any]:
    """The config's generate: section with the flags that were given on top, ready for SALMONN.generate."""
    settings = dict(OmegaConf.to_container(generate_cfg, resolve=True) if isinstance(generate_cfg, DictConfig)
                    else generate_cfg)
    for key in [*GENERATION_FLAGS, "do_sample"]:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    return without_unused_sampling(settings)


def without_unused_sampling(settings: dict[str, Any]) -> dict[str, Any]:
    """Sampling knobs dropped when not sampling: they would do nothing but make transformers warn."""
    if settings.get("do_sample"):
        return settings
    return {k: v for k, v in settings.items() if k not in SAMPLING_ONLY}


def load_model(cfg: DictConfig, device: torch.device, lora_scaling: float | None = None) -> SALMONN:
    """SALMONN from the `model:` section, on `device`, in eval mode, its LoRA merged into the LLM when
    `model.merge_lora` (after the checkpoint and the LoRA scaling). Missing weights raise FileNotFoundError naming
    what to download where. Seeded by run.seed: the random-init demo model and sampling repeat."""
    seed_everything(cfg.run.seed)
    model = SALMONN.from_config(cfg.model)
    if lora_scaling is not None:
        model.set_lora_scaling(lora_scaling)
    if cfg.model.merge_lora:
        model.merge_lora()
    if not cfg.model.ckpt:
        print(f"warning: {untrained_warning(cfg)}", file=sys.stderr, flush=True)
    return model.to(device).eval()


def untrained_warning(cfg: DictConfig) -> str:
    """What decoding without `model.ckpt` means: the Q-Former, projection and LoRA keep their random init."""
    return ("model.ckpt is empty: answering with an untrained SALMONN (the Q-Former, projection and LoRA are "
            "random, so answers do not reflect the audio). Set model.ckpt to salmonn_v1.pth / salmonn_7b_v0.pth or "
            "a checkpoint of ours.")


def provenance(cfg: DictConfig) -> dict[str, Any]:
    """What a score came from: the checkpoint (path, size, sha256; None without one), the resolved config and the
    code version."""
    checkpoint = file_fingerprint(cfg.model.ckpt) if cfg.model.ckpt else None
    return {"checkpoint": checkpoint, "config": config_to_dict(cfg), "code_version": code_version()}


def inference_dtype(cfg: DictConfig, model: SALMONN) -> torch.dtype | None:
    """The autocast dtype for decoding: `run.precision` with the policy training uses (utils.autocast_dtype)."""
    return autocast_dtype(cfg.run.precision, model.device, model.llm_dtype)


# ---------------------------------------------------------------------------------------------- answering
def can_stream(generate_settings: dict[str, Any], batch_size: int) -> bool:
    """HF streamers follow one hypothesis: batch size 1 without beam search."""
    return batch_size == 1 and generate_settings.get("num_beams", 1) == 1


def stream_answer(model: SALMONN, batch: dict[str, Any], generate_settings: dict[str, Any],
                  amp_dtype: torch.dtype | None = None) -> Iterator[str]:
    """Text pieces of the answer as they are generated (one piece with beam search, which cannot stream).

    The pieces join to the model's final answer up to surrounding whitespace."""
    if not can_stream(generate_settings, len(batch["prompt"])):
        with autocast(amp_dtype, model.device):
            yield model.generate(batch, generate_settings)[0]
        return
    streamer = TextIteratorStreamer(model.text.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with autocast(amp_dtype, model.device):  # autocast is per thread
                model.generate(batch, generate_settings, streamer=streamer)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread below, then re-raised
            failure.append(e)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started = False
    for piece in streamer:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece
    thread.join()
    if failure:
        raise failure[0]


class Assistant:
    """A model ready to answer questions about audio: the loaded model with its config, Whisper feature extractor,
    prompt template, autocast dtype and generation settings."""

    def __init__(self, model: SALMONN, cfg: DictConfig, generate_settings: dict[str, Any]):
        self.model = model
        self.cfg = cfg
        self.generate_settings = generate_settings
        self.feature_extractor = load_feature_extractor(cfg.get("datasets", {}).get("whisper_path")
                                                        or cfg.model.whisper_path)
        self.amp_dtype = inference_dtype(cfg, model)

    def batch(self, wav_paths: list[str], prompt: str) -> dict[str, Any]:
        """A one-sample batch; AudioError/FileNotFoundError/ValueError say what is wrong with the input. Turn
        labels follow the prompt's language (Chinese prompts get 第n轮, others Turn n)."""
        if not wav_paths:
            raise ValueError("no audio file given: enter one path per dialogue turn")
        if not prompt.strip():
            raise ValueError("empty prompt: type a question or an instruction about the audio")
        prompt_tokens = len(self.model.text.encode(prompt))
        context = self.model.llama_model.config.max_position_embeddings
        if prompt_tokens > context:  # checked before any audio is read or the model runs
            raise ValueError(f"the prompt is {prompt_tokens} tokens, more than the LLM's context of {context}: "
                             "shorten it")
        return make_batch(wav_paths, prompt.strip(), self.feature_extractor, self.model.text,
                          language=text_language(prompt))

    def answer(self, wav_paths: list[str], prompt: str,
               generate_settings: dict[str, Any] | None = None) -> Iterator[str]:
        """The answer's text pieces, with the assistant's generation settings unless others are given."""
        yield from stream_answer(self.model, self.batch(wav_paths, prompt),
                                 generate_settings or self.generate_settings, self.amp_dtype)


def open_assistant(args: argparse.Namespace) -> Assistant:
    """Config + model + generation settings from the shared flags (add_model_arguments)."""
    cfg = load_inference_config(args.cfg_path, args.options)
    model = load_model(cfg, resolve_device(args.device), args.lora_scaling)
    return Assistant(model, cfg, generation_settings(cfg.generate, args))


# ---------------------------------------------------------------------------------------------- batched decoding
def prediction_record(batch: dict[str, Any], index: int, prediction: str, scorer: Scorer) -> dict[str, Any]:
    """One line of predictions.jsonl: what was asked, what the model answered and what it is scored against,
    with what the scorer read from the answer (Scorer.readings), so a score can be checked line by line."""
    record = {"id": batch["id"][index], "task": batch["task"][index], "language": batch["language"][index],
              "prompt": batch["prompt"][index], "prediction": prediction, "reference": batch["target"][index],
              "emotions": batch["emotions"][index]}
    return {**record, **scorer.readings(record)}


@torch.no_grad()
def decode(model: SALMONN, batches: Iterable[dict[str, Any]], generate_settings: dict[str, Any],
           amp_dtype: torch.dtype | None, scorer: Scorer,
           full_params: Callable[[], AbstractContextManager] = nullcontext, show_progress: bool = True
           ) -> Iterator[dict[str, Any]]:
    """Records (prediction_record) for every sample, in batch order, as each batch is decoded. Batches are
    left-padded and each sample stops at its own end token (SALMONN.generate); `full_params` wraps each generate
    call (FSDP gathers the full parameters there)."""
    settings = without_unused_sampling(dict(generate_settings))
    for batch in tqdm(batches, desc="decode", unit="batch", disable=not show_progress, dynamic_ncols=True):
        with autocast(amp_dtype, model.device), full_params():
            predictions = model.generate(batch, settings)
        for i, prediction in enumerate(predictions):
            yield prediction_record(batch, i, prediction, scorer)


def sample_entries(dataset: Any) -> list[dict[str, Any]]:
    """The annotation entries of a SalmonnDataset (or a Subset of one), in sample order, without loading audio."""
    if isinstance(dataset, Subset):
        return [dataset.dataset.annotation[i] for i in dataset.indices]
    return list(dataset.annotation)


def sample_keys(dataset: Any) -> list[tuple[str, str]]:
    """(id, task) of every sample, in order."""
    return [(entry.get("id", entry.get("path")), entry["task"]) for entry in sample_entries(dataset)]


def check_audio_readable(dataset: Any) -> None:
    """Every clip of the dataset's samples opens as audio (headers only), checked before a model is loaded: a bad
    file fails in seconds, naming the file and its dialogue, not after an hour of decoding."""
    problems = []
    for entry in sample_entries(dataset):
        for path in audio_paths(entry):
            try:
                audio_seconds(path)
            except AudioError as e:
                problems.append(f"{entry.get('id', entry.get('path'))} ({entry['task']}): {e}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise AudioError(f"{len(problems)} unreadable clip(s): " + "; ".join(problems[:10]) + more)


def resume_decode(out_dir: Path, dataset: Any, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The records already decoded into out_dir (none for a new folder), checked before any model is loaded.

    A decode writes predictions.partial.jsonl one line per sample as it goes (decode_remaining), so one that was
    killed continues after its last complete line when run again with the same `identity` (annotation, checkpoint,
    model and generation settings). A folder holding another decode is refused: never mixed, never overwritten."""
    partial, state = out_dir / PARTIAL_PREDICTIONS, out_dir / DECODE_STATE
    identity = json.loads(json.dumps(identity))  # as it reads back from JSON
    if state.exists() and json.loads(state.read_text(encoding="utf-8")) != identity:
        raise FileExistsError(f"{out_dir} holds a decode made with another checkpoint, annotation, model or "
                              f"generation settings (see {state}): choose another --out-dir or remove that folder")
    if (out_dir / "predictions.jsonl").exists() and not state.exists():
        raise FileExistsError(f"{out_dir} already holds predictions.jsonl of an earlier decode: choose another "
                              "--out-dir or remove that folder")
    done = read_partial_records(partial)
    keys = sample_keys(dataset)
    if [(r["id"], r["task"]) for r in done] != keys[:len(done)]:
        raise FileExistsError(f"{partial} does not match the samples of this annotation: remove it to decode again")
    out_dir.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(identity, ensure_ascii=False, indent=1), encoding="utf-8")
    if done:
        print(f"continuing the decode in {out_dir}: {len(done)} of {len(keys)} samples already done", flush=True)
    return done


def decode_remaining(out_dir: Path, model: SALMONN, dataset: Any, done: list[dict[str, Any]],
                     generate_settings: dict[str, Any], amp_dtype: torch.dtype | None, batch_size: int,
                     num_workers: int, scorer: Scorer) -> list[dict[str, Any]]:
    """`done` plus the records of the samples after it, each appended to predictions.partial.jsonl as it comes."""
    remaining = Subset(dataset, range(len(done), len(sample_keys(dataset))))
    loader = DataLoader(remaining, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate)
    records = list(done)
    with open(out_dir / PARTIAL_PREDICTIONS, "a", encoding="utf-8") as f:
        for record in decode(model, loader, generate_settings, amp_dtype, scorer):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            records.append(record)
    return records


def read_partial_records(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a partial predictions file; a last line cut by a kill is dropped (and rewritten)."""
    if not path.exists():
        return []
    lines = read_jsonl(path)
    cut = bool(lines) and (isinstance(lines[-1][1], JsonlError) or not path.read_bytes().endswith(b"\n"))
    records = [value for _, value in (lines[:-1] if cut else lines)]
    bad = next((value for value in records if isinstance(value, JsonlError)), None)
    if bad is not None:
        raise FileExistsError(f"{bad}: a partial decode's line is broken before its end: remove {path} to decode "
                              "again")
    if cut:
        write_predictions(records, path)
    return records


def write_predictions(records: list[dict[str, Any]], path: Path) -> None:
    """predictions.jsonl: one JSON record per line, written atomically."""
    with atomic_file(path) as f:
        f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_decode_outputs(records: list[dict[str, Any]], out_dir: Path, cfg: DictConfig, info: dict[str, Any],
                         scorer: Scorer) -> tuple[dict[str, float], dict[str, int]]:
    """What a decode leaves in out_dir: predictions.jsonl (each record with the checkpoint's sha256),
    submission_<task>.csv and scores.json (the scores, per-group sample counts, `info` such as the annotation and
    generation settings, and the provenance: checkpoint, resolved config, code version). Returns (scores, counts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    source = provenance(cfg)
    checkpoint_sha256 = source["checkpoint"]["sha256"] if source["checkpoint"] else None
    write_predictions([{**r, "checkpoint_sha256": checkpoint_sha256} for r in records], out_dir / "predictions.jsonl")
    write_submissions(records, out_dir)
    scores = scorer.score(records)
    counts = {f"{task}/{language}": len(group) for (task, language), group in group_records(records).items()}
    write_json_atomic(out_dir / "scores.json",
                      {**info, "num_samples": len(records), "counts": counts, "scores": scores, **source})
    return scores, counts


# ---------------------------------------------------------------------------------------------- Nota's CSV
# Nota's audiolm-evaluator takes one `testset_id,text` CSV per task (its submission_validator.py checks the ids).
SUBMISSION_HEADER = ["testset_id", "text"]
_NOTA_ID = re.compile(r"test\d{4}")  # the ids of Nota's evaluator sets (its submission_validator.py)
_NOTA_LIKE_ID = re.compile(r"test\d")


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

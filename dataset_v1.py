"""Audio loading, clips, the dataset (HumDial dialogues and the original single-clip format) and the collate function.

`datasets:` keys (configs/*.yaml; defaults and allowed values in config.py); from `model:` it reads
whisper_path, prompt_path, test_prompt_path, prompt_template and multi_prompt (a path given in `datasets:` wins),
and for turn_mode packed second_per_window, second_stride and window_level_Qformer:

    datasets:
      train_ann_path: data/demo/ann/train.json  # annotations written by convert.py
      valid_ann_path: data/demo/ann/valid.json
      test_ann_path: data/demo/ann/test.json
      turn_mode: per_turn      # per_turn (default): each user turn is encoded on its own (a turn > 30 s as several
                               #   30 s clips) and gets its own <SpeechHere> slot in a "Turn n:" line of the prompt
                               # concat: the original fine-tune, for comparison: the turns joined with
                               #   concat_gap_s of silence into one clip, cut at 30 s (a warning counts the cuts)
                               # packed: the turns laid end to end in shared 30 s clips, each turn starting on a
                               #   Q-Former window boundary (the rest of its last window zeros; a turn that does
                               #   not fit goes on in the next clip); each turn's slot, in "Turn n:" lines as in
                               #   per_turn, gets exactly the windows holding its samples: fewer encoder passes.
                               #   Needs non-overlapping windows (model.second_stride == second_per_window)
      text_inputs: audio       # audio (default; the challenge's test set gives only the user's audio)
                               # | audio+transcript | audio+transcript+replies (earlier assistant replies)
      concat_gap_s: 0.5        # silence between turns in concat mode
      silence_audio: false     # ablation: every clip replaced by zeros of the same length (what can the model
                               #   learn without hearing anything? see README "Does it listen?")

Training ("train" split) with `model.multi_prompt` draws a prompt at random from prompt_path, seeded by (seed,
epoch, index) so that a resumed run sees the same prompts: call `dataset.set_epoch(epoch)` before each epoch
(with non-persistent DataLoader workers); without it every sample gets its task's first prompt. Evaluation
("valid"/"test") uses the first prompt of test_prompt_path.

An annotation entry with `turns` is a dialogue (see convert.py for its fields); any other entry is the original
format `{"path", "text", "task"?, "Q"?, "expand_wav"?}` (no task: asr) or Nota's (`testset_id`: the id; `text`
may be absent in a test set). Relative audio paths resolve against `datasets.prefix` when set, else the
annotation file's folder; a split may be a list of annotation files (read_annotation). The batch format is in
docs/design.md ("A batch"); besides its keys, each sample carries
`language` and `emotions` (the per-turn labels; [] for single-clip entries) for the metrics.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr
import torch
from torch.utils.data import Dataset
from transformers import WhisperFeatureExtractor

from config import CHOICES, section_defaults
from models import SAMPLE_RATE, SPEECH_SLOT, WHISPER_CONV_STRIDE, window_frames
from models.llm import IGNORE_INDEX, ChatText
from prompting import (PromptError, TurnText, choose_prompt, conversation, expand_turns, load_prompts, prompt_key,
                       question_messages)

log = logging.getLogger(__name__)

MIN_CLIP_SAMPLES = SAMPLE_RATE  # shorter clips are zero-padded, as the original (BEATs needs a few frames)
EXPAND_WAV_GAP_SAMPLES = 1600  # the original's silence between `expand_wav` files
BATCH_LIST_KEYS = ("prompt", "target", "task", "Q", "id", "language", "emotions")


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file."""


class AnnotationError(ValueError):
    """An annotation file or entry that cannot be used; the message names file, entry and key."""


# ---------------------------------------------------------------------------------------------- audio
def load_audio(path: str | os.PathLike) -> np.ndarray:
    """float32 mono 16 kHz samples of a wav/flac/ogg file: channels averaged, any rate resampled (soxr HQ)."""
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        wav, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    if wav.shape[0] == 0:
        raise AudioError(f"audio file has no samples: {path}")
    if not np.isfinite(wav).all():
        raise AudioError(f"audio file has non-finite samples (NaN or inf): {path}")
    mono = wav.mean(axis=1)
    if rate != SAMPLE_RATE:
        mono = soxr.resample(mono, rate, SAMPLE_RATE, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def audio_seconds(path: str | os.PathLike) -> float:
    """Duration of an audio file from its header, nothing decoded: the cheap check that a file is usable audio
    (missing, unreadable, empty or truncated files raise AudioError naming the file), done before a model is
    loaded."""
    if not os.path.isfile(path):
        raise AudioError(f"audio file not found: {path}")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    if info.frames == 0:
        raise AudioError(f"audio file has no samples: {path}")
    if wav_truncation(info):
        raise AudioError(f"audio file is truncated: {path} ({wav_truncation(info)})")
    return info.frames / info.samplerate


def audio_problem(path: Path, read_samples: bool = False) -> str | None:
    """What is wrong with an audio file (audio_seconds' checks; with read_samples also undecodable or non-finite
    samples), or None: for readers that report every bad file rather than stop at the first."""
    try:
        audio_seconds(path)
        samples = sf.read(str(path), dtype="float32")[0] if read_samples else None
    except AudioError as e:
        return str(e)
    except (sf.LibsndfileError, RuntimeError) as e:
        return f"cannot read audio file {path}: {e}"
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


def pad_to_min(wav: np.ndarray) -> np.ndarray:
    """Zero-pads a clip shorter than 1 s to 1 s."""
    return np.pad(wav, (0, max(0, MIN_CLIP_SAMPLES - len(wav))))


def split_clips(wav: np.ndarray, max_samples: int) -> list[np.ndarray]:
    """Consecutive clips of at most the encoder's window (30 s for Whisper) covering every sample (the last one
    padded to >= 1 s)."""
    if len(wav) == 0:
        raise AudioError("cannot split empty audio into clips")
    clips = [wav[start:start + max_samples] for start in range(0, len(wav), max_samples)]
    clips[-1] = pad_to_min(clips[-1])
    return clips


def join_with_gaps(wavs: list[np.ndarray], gap_samples: int) -> np.ndarray:
    """The waves one after another with `gap_samples` of silence between them."""
    gap = np.zeros(gap_samples, dtype=np.float32)
    pieces = [piece for wav in wavs for piece in (gap, wav)][1:]
    return np.concatenate(pieces)


def packed_layout(feature_extractor: WhisperFeatureExtractor, second_per_window: float,
                  second_stride: float) -> tuple[int, int]:
    """turn_mode packed: (samples per Q-Former window, windows per clip), by the model's rule (models.window_frames)
    on Whisper's encoder frame rate (hop_length x WHISPER_CONV_STRIDE samples a frame). A clip's last frames, fewer
    than a window, belong to no window: 30 s at 0.333333 s hold 88 windows of 17 frames (5440 samples)."""
    samples_per_frame = feature_extractor.hop_length * WHISPER_CONV_STRIDE
    kernel, stride = window_frames(SAMPLE_RATE / samples_per_frame, second_per_window, second_stride)
    if kernel != stride:
        raise ValueError(f"datasets.turn_mode: packed needs Q-Former windows that do not overlap: model.second_stride "
                         f"({second_stride} s = {stride} encoder frames) must equal model.second_per_window "
                         f"({second_per_window} s = {kernel} frames)")
    frames_per_clip = feature_extractor.n_samples // samples_per_frame
    if not 1 <= kernel <= frames_per_clip:
        raise ValueError(f"datasets.turn_mode: packed: model.second_per_window {second_per_window} s gives windows of "
                         f"{kernel} encoder frames; a clip holds {frames_per_clip}")
    return kernel * samples_per_frame, (frames_per_clip - kernel) // stride + 1


def packed_clips(wavs: list[np.ndarray], window_samples: int,
                 windows_per_clip: int) -> tuple[list[np.ndarray], list[list[tuple[int, int, int]]]]:
    """turn_mode packed: the turns end to end in clips of `windows_per_clip` windows, each turn zero-padded to whole
    windows (so the next starts on a boundary, and no window holds two turns); per turn the spans (clip, first
    window, number of windows) that hold its samples, in order: a turn that does not fit goes on in the next clip."""
    padded, slots, start = [], [], 0
    for wav in wavs:
        count = -(-len(wav) // window_samples)  # ceil: the windows this turn's samples need
        padded.append(np.pad(wav, (0, count * window_samples - len(wav))))
        slots.append(window_spans(start, count, windows_per_clip))
        start += count
    return split_clips(np.concatenate(padded), window_samples * windows_per_clip), slots


def window_spans(first: int, count: int, windows_per_clip: int) -> list[tuple[int, int, int]]:
    """Windows first .. first + count - 1 of the packed stream as (clip, first window, number of windows) spans."""
    spans = []
    while count:
        clip, window = divmod(first, windows_per_clip)
        n = min(count, windows_per_clip - window)
        spans.append((clip, window, n))
        first, count = first + n, count - n
    return spans


def load_feature_extractor(whisper_path: str | os.PathLike) -> WhisperFeatureExtractor:
    """Whisper's log-mel extractor from `<whisper_path>/preprocessor_config.json` (local file, no hub)."""
    config = Path(whisper_path) / "preprocessor_config.json"
    if not config.is_file():
        raise FileNotFoundError(f"Whisper feature-extractor config not found: {config}. Download whisper-large-v2 "
                                f"(Hugging Face format) to '{whisper_path}' (or point the config at where it is)")
    return WhisperFeatureExtractor.from_json_file(str(config))


def log_mel(clips: list[np.ndarray], feature_extractor: WhisperFeatureExtractor) -> np.ndarray:
    """[len(clips), 80, 3000] float32: each clip padded to 30 s, as Whisper expects."""
    features = feature_extractor(clips, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"]
    return features.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------- annotations
def read_annotation(ann_path: str | os.PathLike | Sequence[str | os.PathLike], audio_root: str | None = None, *,
                    blind_ok: bool = False, check_audio: bool = True) -> list[dict]:
    """Entries of a `{"annotation": [...]}` file, or of a list of them read in order (each entry's `ann_file` says
    which), checked, with audio paths made absolute: a relative path resolves against `audio_root`
    (datasets.prefix, the audio root of the original's and Nota's configs), else against its file's folder.

    The original's and Nota's single-clip entries are read as they meant them: without `task` an entry is ASR
    (counted in the log), Nota's `testset_id` is the entry's `id` (the submission CSV's key), and with `blind_ok`
    (a test set to decode, not to score) `text` may be absent. `check_audio=False`: ids and texts only (the
    submission validator), the audio files are not looked for."""
    if not isinstance(ann_path, (str, os.PathLike)):
        return [entry for path in ann_path
                for entry in read_annotation(path, audio_root, blind_ok=blind_ok, check_audio=check_audio)]
    ann_path = Path(ann_path)
    if not ann_path.is_file():
        raise FileNotFoundError(f"annotation file not found: {ann_path}")
    with open(ann_path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise AnnotationError(f"{ann_path}:{e.lineno}: malformed JSON: {e.msg}") from e
    if not isinstance(data, dict) or not isinstance(data.get("annotation"), list):
        raise AnnotationError(f'{ann_path}: expected {{"annotation": [...]}}')
    base = Path(audio_root) if audio_root else ann_path.parent
    entries = [checked_entry(entry, f"{ann_path}: annotation[{i}]", base, blind_ok, check_audio)
               for i, entry in enumerate(data["annotation"])]
    untasked = sum(not isinstance(entry, dict) or "task" not in entry for entry in data["annotation"])
    if untasked:
        log.info("%s: %d of %d entries have no `task`: read as asr, as the original SALMONN does", ann_path,
                 untasked, len(entries))
    return [{**entry, "ann_file": str(ann_path)} for entry in entries]


def is_dialogue(entry: Mapping[str, Any]) -> bool:
    return "turns" in entry


def audio_paths(entry: Mapping[str, Any]) -> list[str]:
    """The audio files of an entry, in order: a dialogue's turns, or a file and its `expand_wav` files."""
    if is_dialogue(entry):
        return [turn["path"] for turn in entry["turns"]]
    return [entry["path"], *entry["expand_wav"]]


def checked_entry(entry: Any, where: str, base: Path, blind_ok: bool = False, check_audio: bool = True) -> dict:
    """The entry with its required keys checked and its audio paths resolved against `base` (read_annotation says
    how the original's and Nota's entries are read)."""
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: an entry must be an object")
    entry = dict(entry)
    if "testset_id" in entry:
        if not isinstance(entry["testset_id"], str) or not entry["testset_id"].strip():
            raise AnnotationError(f"{where}: testset_id must be a non-empty string, got {entry['testset_id']!r}")
        if entry.setdefault("id", entry["testset_id"]) != entry["testset_id"]:
            raise AnnotationError(f"{where}: id {entry['id']!r} and testset_id {entry['testset_id']!r} differ: give "
                                  "one of them")
    if not is_dialogue(entry):
        entry.setdefault("task", "asr")
        if blind_ok:
            entry.setdefault("text", "")
    required = ("id", "task", "turns", "text") if is_dialogue(entry) else ("path", "text", "task")
    for key in required:
        if key not in entry:
            raise AnnotationError(f"{where}: missing key {key!r}")
    for key in ("task", "text"):
        if not isinstance(entry[key], str):
            raise AnnotationError(f"{where}: {key} must be a string, got {entry[key]!r}")
    if not is_dialogue(entry):
        expand = entry.get("expand_wav", [])
        if not isinstance(expand, list):
            raise AnnotationError(f"{where}: expand_wav must be a list of audio paths, got {expand!r}")
        entry["path"] = resolved_audio(entry["path"], where, base, check_audio)
        entry["expand_wav"] = [resolved_audio(p, where, base, check_audio) for p in expand]
        return entry
    if not isinstance(entry["turns"], list) or not entry["turns"]:
        raise AnnotationError(f"{where}: dialogue {entry['id']}: 'turns' must be a non-empty list")
    turns = []
    for n, turn in enumerate(entry["turns"], start=1):
        if not isinstance(turn, dict) or "path" not in turn:
            raise AnnotationError(f"{where}: dialogue {entry['id']}, turn {n}: missing key 'path'")
        turns.append({**turn, "path": resolved_audio(turn["path"], f"{where}, turn {n}", base, check_audio)})
    entry["turns"] = turns
    return entry


def resolved_audio(path: Any, where: str, base: Path, check_audio: bool = True) -> str:
    """`path` against `base` (an absolute path stays as it is); AnnotationError when the file is not there."""
    if not isinstance(path, str) or not path.strip():
        raise AnnotationError(f"{where}: an audio path must be a non-empty string, got {path!r}")
    full = base / path
    if check_audio and not full.is_file():
        raise AnnotationError(f"{where}: audio file not found: {full}")
    return str(full)


# ---------------------------------------------------------------------------------------------- dataset
class SalmonnDataset(Dataset):
    """Dialogue and single-clip entries -> items of clips, speech slots and prompt; `collate` makes a batch."""

    def __init__(self, annotation: list[dict], feature_extractor: WhisperFeatureExtractor,
                 prompts: dict[str, list[str]], text: ChatText, *, training: bool, random_prompts: bool, turn_mode: str,
                 text_inputs: str, concat_gap_s: float, silence_audio: bool, seed: int,
                 second_per_window: float, second_stride: float, window_level_Qformer: bool):
        for key, value in (("turn_mode", turn_mode), ("text_inputs", text_inputs)):
            allowed = CHOICES[f"datasets.{key}"]
            if value not in allowed:
                raise ValueError(f"datasets.{key} must be one of {', '.join(allowed)}, got {value!r}")
        if turn_mode == "concat" and text_inputs != "audio":
            raise ValueError("turn_mode concat reproduces the original fine-tune, which shows audio only: "
                             "use text_inputs: audio with it")
        if turn_mode == "packed" and not window_level_Qformer:
            raise ValueError("datasets.turn_mode: packed gives each turn its Q-Former windows: it needs "
                             "model.window_level_Qformer: true")
        self.annotation = annotation
        self.feature_extractor = feature_extractor
        self.prompts = prompts
        self.text = text  # the LLM's template and tokenizer: items carry token ids
        self.training = training
        self.random_prompts = training and random_prompts
        self.turn_mode = turn_mode
        self.text_inputs = text_inputs
        self.concat_gap_samples = round(concat_gap_s * SAMPLE_RATE)
        self.silence_audio = silence_audio
        self.max_clip_samples = feature_extractor.n_samples  # the encoder's window: 30 s for Whisper
        self.packed_layout = (packed_layout(feature_extractor, second_per_window, second_stride)
                              if turn_mode == "packed" else None)  # (samples per window, windows per clip)
        self.seed = seed
        self.epoch = 0
        self.concat_cuts = 0
        check_prompts_cover(annotation, prompts, per_turn=turn_mode != "concat")

    def set_epoch(self, epoch: int) -> None:
        """Training prompts depend on (seed, epoch, index): set before each epoch for exact resumption."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.annotation)

    def audio_seconds(self) -> list[float]:
        """Each sample's audio duration, from the file headers (nothing decoded): what `run.group_by_length`
        groups by, as a sample's speech tokens and per-turn prompt grow with it."""
        seconds: dict[str, float] = {}
        for entry in self.annotation:
            for path in audio_paths(entry):
                if path not in seconds:
                    seconds[path] = audio_seconds(path)
        return [sum(seconds[p] for p in audio_paths(entry)) for entry in self.annotation]

    def prompt_rng(self, index: int) -> random.Random | None:
        """The sample's prompt draw (training with multi_prompt), or None: the task's first prompt."""
        return random.Random(f"{self.seed}:{self.epoch}:{index}") if self.random_prompts else None

    def __getitem__(self, index: int) -> dict:
        entry = self.annotation[index]
        rng = self.prompt_rng(index)
        try:
            item = self.dialogue_item(entry, rng) if is_dialogue(entry) else self.single_clip_item(entry, rng)
        except AudioError as e:  # name the sample too: the file alone does not say where it is used
            raise AudioError(f"{entry.get('id', entry.get('path'))} ({entry['task']}): {e}") from e
        if self.silence_audio:
            item["clips"] = [np.zeros_like(clip) for clip in item["clips"]]
        item["spectrogram"] = log_mel(item["clips"], self.feature_extractor)
        return item

    def single_clip_item(self, entry: dict, rng: random.Random | None) -> dict:
        """Original format: the file (plus `expand_wav` files, 0.1 s apart) in one slot, never cut at 30 s."""
        wavs = [load_audio(p) for p in audio_paths(entry)]
        clips = split_clips(join_with_gaps(wavs, EXPAND_WAV_GAP_SAMPLES), self.max_clip_samples)
        language = entry.get("language", "")
        prompt = choose_prompt(self.prompts, prompt_key(self.prompts, entry["task"], language),
                               entry.get("Q", ""), rng)
        sample_id = entry.get("id", entry["path"])
        return sample(self.text, conversation(prompt, None, language, False), clips, [list(range(len(clips)))],
                      target=entry["text"], task=entry["task"], question=entry.get("Q", ""), sample_id=sample_id,
                      language=language, emotions=[])

    def dialogue_item(self, entry: dict, rng: random.Random | None) -> dict:
        wavs = [load_audio(p) for p in audio_paths(entry)]
        language = entry.get("language", "")
        shows_transcripts = self.text_inputs != "audio"
        question = entry.get("Q", "") if shows_transcripts else ""  # audio only: the question stays in speech
        prompt = choose_prompt(self.prompts, prompt_key(self.prompts, entry["task"], language), question, rng)
        if self.turn_mode == "concat":
            clips, slots = [self.concatenated(wavs, entry["id"])], [[0]]
            messages = conversation(prompt, None, language, False)
        else:
            clips, slots = (packed_clips(wavs, *self.packed_layout) if self.turn_mode == "packed"
                            else per_turn_clips(wavs, self.max_clip_samples))
            messages = conversation(prompt, self.turn_texts(entry["turns"]), language, self.text.uses_chat_template)
        return sample(self.text, messages, clips, slots, target=entry["text"], task=entry["task"],
                      question=entry.get("Q", ""), sample_id=entry["id"], language=language,
                      emotions=[turn.get("emotion", "") for turn in entry["turns"]])

    def turn_texts(self, turns: list[dict]) -> list[TurnText]:
        """What text each turn shows besides its speech, per `text_inputs`."""
        shows_transcripts = self.text_inputs != "audio"
        shows_replies = self.text_inputs == "audio+transcript+replies"
        return [TurnText(transcript=turn.get("transcript") if shows_transcripts else None,
                         reply=turn.get("reply") if shows_replies else None) for turn in turns]

    def concatenated(self, wavs: list[np.ndarray], dialogue_id: str) -> np.ndarray:
        """The original fine-tune's input: turns joined by silence, cut at 30 s (cuts are counted and logged)."""
        joined = join_with_gaps(wavs, self.concat_gap_samples)
        if len(joined) > self.max_clip_samples:
            self.concat_cuts += 1
            log.warning("turn_mode concat: dialogue %s has %.1f s of audio, cut to %.0f s (%d dialogue(s) cut so "
                        "far in this process)", dialogue_id, len(joined) / SAMPLE_RATE,
                        self.max_clip_samples / SAMPLE_RATE, self.concat_cuts)
        return pad_to_min(joined[:self.max_clip_samples])


def per_turn_clips(wavs: list[np.ndarray], max_samples: int) -> tuple[list[np.ndarray], list[list[int]]]:
    """All turns' clips, and per turn the indices of its clips (several when a turn is longer than 30 s)."""
    clips: list[np.ndarray] = []
    slots: list[list[int]] = []
    for wav in wavs:
        turn_clips = split_clips(wav, max_samples)
        slots.append(list(range(len(clips), len(clips) + len(turn_clips))))
        clips.extend(turn_clips)
    return clips, slots


def sample(text: ChatText, messages: list[dict[str, str]], clips: list[np.ndarray], slots: list[list[int]], *,
           target: str, task: str, question: str, sample_id: str, language: str, emotions: list[str]
           ) -> dict[str, Any]:
    """One sample as every reader builds it (an original-format clip, a dialogue, make_batch): its clips and
    speech slots, what it asks and must answer, and its conversation rendered by the LLM's template and tokenised:
    the prompt text (kept for the records), its ids, the positions of its speech slots and the target's ids (cut
    at max_txt_len, with a warning, keeping its end token)."""
    prompt = text.render(messages)
    prompt_ids, slot_positions = text.prompt_ids(prompt)
    target_ids, cut = text.target_ids(target)
    if cut:
        log.warning("%s: target cut to model.max_txt_len=%d tokens (its end token kept): '%s...'", sample_id,
                    text.max_txt_len, target[:60])
    return {"clips": clips, "slots": slots, "target": target, "task": task, "Q": question, "id": sample_id,
            "language": language, "emotions": emotions, "prompt": prompt, "prompt_ids": prompt_ids,
            "target_ids": target_ids, "slot_positions": slot_positions}


def check_prompts_cover(annotation: list[dict], prompts: dict[str, list[str]], per_turn: bool) -> None:
    """Fails at construction, not mid-epoch, when a task has no prompt or a dialogue prompt cannot expand."""
    missing = set()
    for entry in annotation:
        task = prompt_key(prompts, entry["task"], entry.get("language", ""))
        if task not in prompts:
            missing.add(task)
        elif per_turn and is_dialogue(entry):
            for prompt in prompts[task]:
                expand_turns(prompt, [TurnText()], entry.get("language", ""))
    if missing:
        raise PromptError(f"the prompt file has no prompt for task(s) {', '.join(sorted(missing))}; "
                          f"known tasks: {', '.join(sorted(prompts))}")


def token_batch(items: list[dict]) -> dict[str, Any]:
    """The token side of a batch from items' `prompt_ids`, `target_ids` and `slot_positions` (tokenised)."""
    rows = [item["prompt_ids"] + item["target_ids"] for item in items]
    input_ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # padding is never embedded
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for b, (row, item) in enumerate(zip(rows, items)):
        input_ids[b, :len(row)] = torch.tensor(row)
        labels[b, len(item["prompt_ids"]):len(row)] = torch.tensor(item["target_ids"])
    return {
        "input_ids": input_ids,  # [B, T]: prompt then target ids, right-padded
        "attention_mask": (torch.arange(input_ids.shape[1]) < torch.tensor([len(r) for r in rows])[:, None]).long(),
        "labels": labels,  # [B, T]: the target ids, IGNORE_INDEX elsewhere
        "prompt_lengths": torch.tensor([len(item["prompt_ids"]) for item in items]),  # [B]: what generation sees
        "slot_positions": [item["slot_positions"] for item in items],  # per sample: where each slot's speech goes
    }


def collate(items: list[dict]) -> dict[str, Any]:
    """Items -> the batch of docs/design.md: one row per clip, `speech_slots` mapping samples' slots to rows (a
    packed turn's (clip, first window, windows) spans keep their windows, their clip moved to its row)."""
    clips = [clip for item in items for clip in item["clips"]]
    lengths = torch.tensor([len(clip) for clip in clips])
    raw_wav = torch.zeros(len(clips), int(lengths.max()))
    for row, clip in enumerate(clips):
        raw_wav[row, :len(clip)] = torch.from_numpy(clip)
    speech_slots, offset = [], 0
    for item in items:
        speech_slots.append([[(offset + part[0], *part[1:]) if isinstance(part, tuple) else offset + part
                              for part in slot] for slot in item["slots"]])
        offset += len(item["clips"])
    return {
        **token_batch(items),
        "spectrogram": torch.from_numpy(np.concatenate([item["spectrogram"] for item in items])),
        "raw_wav": raw_wav,
        "padding_mask": torch.arange(raw_wav.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1),
        "speech_slots": speech_slots,
        **{key: [item[key] for item in items] for key in BATCH_LIST_KEYS},
    }


# ---------------------------------------------------------------------------------------------- construction
def build_dataset(ann_path: str | Sequence[str], cfg: Any, split: str, model_cfg: Any = None, *, seed: int = 0,
                  feature_extractor: WhisperFeatureExtractor | None = None) -> SalmonnDataset:
    """The dataset of one split, from an annotation file or a list of them (read_annotation: relative audio paths
    against datasets.prefix when set; a test split may be blind). cfg: the `datasets:` section; model_cfg: the
    `model:` section (either may be partial: config.py fills the defaults); seed: the run's seed. The datasets
    section's whisper_path, prompt_path, test_prompt_path and prompt_template, when set, win over the model
    section's."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    data, model = section_defaults("datasets", cfg), section_defaults("model", model_cfg)
    setting = {key: data[key] or model[key]
               for key in ("whisper_path", "prompt_path", "test_prompt_path", "prompt_template")}
    training = split == "train"
    prompt_path = setting["prompt_path"] if training else setting["test_prompt_path"] or setting["prompt_path"]
    if not prompt_path:
        raise ValueError("no prompt file configured: set model.prompt_path (and model.test_prompt_path)")
    if feature_extractor is None and not setting["whisper_path"]:
        raise ValueError("model.whisper_path is not set: it holds Whisper's preprocessor_config.json")
    return SalmonnDataset(
        read_annotation(ann_path, data["prefix"], blind_ok=split == "test"),
        feature_extractor or load_feature_extractor(setting["whisper_path"]),
        load_prompts(str(prompt_path)),
        ChatText.from_config({**model, "prompt_template": setting["prompt_template"]}),
        training=training,
        random_prompts=bool(model["multi_prompt"]),
        turn_mode=data["turn_mode"],
        text_inputs=data["text_inputs"],
        concat_gap_s=float(data["concat_gap_s"]),
        silence_audio=bool(data["silence_audio"]),
        seed=seed,
        second_per_window=float(model["second_per_window"]),
        second_stride=float(model["second_stride"]),
        window_level_Qformer=bool(model["window_level_Qformer"]),
    )


def make_batch(wav_paths: list[str], prompt: str, feature_extractor: WhisperFeatureExtractor, text: ChatText, *,
               task: str = "", language: str = "en") -> dict[str, Any]:
    """A one-sample batch from audio files, one per turn (CLI, web demo). `prompt` is either the user message
    with one <SpeechHere> per file or a plain question, asked about the files as dialogue turns; the LLM's
    template is applied to both."""
    if not wav_paths:
        raise ValueError("make_batch needs at least one audio file")
    if SPEECH_SLOT in prompt:
        if prompt.count(SPEECH_SLOT) != len(wav_paths):
            raise PromptError(f"the prompt has {prompt.count(SPEECH_SLOT)} {SPEECH_SLOT} slots for "
                              f"{len(wav_paths)} audio file(s)")
        question, messages = "", [{"role": "user", "content": prompt}]
    else:
        question, messages = prompt, question_messages(prompt, len(wav_paths), language, text.uses_chat_template)
    clips, slots = per_turn_clips([load_audio(p) for p in wav_paths], feature_extractor.n_samples)
    sample_id = "+".join(map(str, wav_paths))
    item = sample(text, messages, clips, slots, target="", task=task, question=question, sample_id=sample_id,
                  language=language, emotions=[])
    return collate([{**item, "spectrogram": log_mel(clips, feature_extractor)}])

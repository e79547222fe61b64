import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from dataset_v1 import (AnnotationError, AudioError, build_dataset, collate, load_audio, load_feature_extractor,
                        make_batch, split_clips)
from models import MODEL_DEFAULTS
from models import SAMPLE_RATE
from models.llm import ChatText
from prompting import SPEECH_SLOT, PromptError

ROOT = Path(__file__).resolve().parent.parent
PARITY = ROOT / "tests" / "parity"
MODEL_CFG = {"whisper_path": str(PARITY / "whisper_dir"), "prompt_path": str(ROOT / "prompts" / "train_prompt.json"),
             "test_prompt_path": str(ROOT / "prompts" / "test_prompt.json"),
             "prompt_template": MODEL_DEFAULTS["prompt_template"], "llm_path": str(PARITY / "llama_dir")}


@pytest.fixture(scope="module")
def feature_extractor():
    return load_feature_extractor(PARITY / "whisper_dir")


def tone(seconds: float, rate: int, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def dominant_frequency(wav: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wav * np.hanning(len(wav))))
    return float(np.fft.rfftfreq(len(wav), 1 / rate)[spectrum.argmax()])


# ------------------------------------------------------------------------------------------- load_audio
@pytest.mark.parametrize("rate", [8000, 22050, 44100])
def test_load_audio_resamples_to_16k_keeping_the_tone(tmp_path, rate):
    path = tmp_path / "tone.wav"
    sf.write(str(path), tone(1.0, rate, freq=1000.0), rate)
    wav = load_audio(path)
    assert wav.dtype == np.float32 and abs(len(wav) - SAMPLE_RATE) <= 1
    assert dominant_frequency(wav, SAMPLE_RATE) == pytest.approx(1000.0, abs=2.0)
    assert np.abs(wav[2000:-2000]).max() == pytest.approx(0.3, abs=0.01)  # a proper resampler keeps the level


def test_load_audio_averages_stereo_channels(tmp_path):
    rng = np.random.default_rng(0)
    left, right = rng.uniform(-0.5, 0.5, 8000), rng.uniform(-0.5, 0.5, 8000)
    path = tmp_path / "stereo.wav"
    sf.write(str(path), np.stack([left, right], axis=1), SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), (left + right) / 2, atol=1e-6)


@pytest.mark.parametrize("extension", ["wav", "flac", "ogg"])
def test_load_audio_reads_wav_flac_ogg(tmp_path, extension):
    path = tmp_path / f"tone.{extension}"
    sf.write(str(path), tone(0.5, 22050, freq=600.0), 22050)
    wav = load_audio(path)
    assert abs(len(wav) - 8000) <= 1
    assert dominant_frequency(wav, SAMPLE_RATE) == pytest.approx(600.0, abs=3.0)


def test_load_audio_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match=r"no samples: .*empty\.wav"):
        load_audio(empty)
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"this is not audio" * 10)
    with pytest.raises(AudioError, match=r"cannot read audio file .*garbage\.wav"):
        load_audio(garbage)
    with pytest.raises(AudioError, match=r"not found: .*missing\.flac"):
        load_audio(tmp_path / "missing.flac")


def test_split_clips_keeps_every_sample_and_pads_short_clips():
    window = 30 * SAMPLE_RATE  # Whisper's
    wav = np.arange(40 * SAMPLE_RATE, dtype=np.float32)
    clips = split_clips(wav, window)
    assert [len(c) for c in clips] == [window, 10 * SAMPLE_RATE]
    np.testing.assert_array_equal(np.concatenate(clips), wav)
    short = split_clips(np.ones(4000, dtype=np.float32), window)
    assert len(short) == 1 and len(short[0]) == SAMPLE_RATE and short[0][4000:].sum() == 0
    assert len(split_clips(np.ones(60 * SAMPLE_RATE, dtype=np.float32), window)) == 2


# ------------------------------------------------------------------------------------------- dialogues
def write_dialogue(tmp_path: Path, seconds: list[float], rates: list[int] | None = None,
                   dialogue_id: str = "en_0001_0001", name: str = "ann.json") -> Path:
    """An annotation (convert.py's output shape) with one tone file per turn; returns its path."""
    rates = rates or [SAMPLE_RATE] * len(seconds)
    turns = []
    for n, (length, rate) in enumerate(zip(seconds, rates), start=1):
        audio = tmp_path / "audio" / f"{dialogue_id}_{n}.wav"
        audio.parent.mkdir(exist_ok=True)
        sf.write(str(audio), tone(length, rate, freq=200.0 + 100 * n), rate)
        turns.append({"path": f"audio/{audio.name}", "transcript": f"words of turn {n}",
                      "emotion": ("sad", "happy", "anger", "fear", "neutral")[n - 1], "duration": length,
                      "reply": f"reply to turn {n}"})
    del turns[-1]["reply"]
    entry = {"id": dialogue_id, "task": "emotional_trajectory", "language": "en", "Q": "words of turn last",
             "text": "You started sad, then happy, and ended up angry.", "turns": turns}
    path = tmp_path / name
    entries = json.loads(path.read_text())["annotation"] if path.exists() else []
    path.write_text(json.dumps({"annotation": entries + [entry]}))
    return path


def test_long_dialogue_keeps_every_turn_in_the_batch(tmp_path, feature_extractor):
    ann = write_dialogue(tmp_path, [40.0, 12.0, 5.0])  # 57 s of user speech; the first turn alone > 30 s
    dataset = build_dataset(str(ann), {}, "test", MODEL_CFG, feature_extractor=feature_extractor)
    batch = collate([dataset[0]])
    assert batch["speech_slots"] == [[[0, 1], [2], [3]]]  # the 40 s turn: two clips in one slot
    lengths = (~batch["padding_mask"]).sum(dim=1).tolist()
    assert lengths == [30 * SAMPLE_RATE, 10 * SAMPLE_RATE, 12 * SAMPLE_RATE, 5 * SAMPLE_RATE]
    turns = [load_audio(tmp_path / "audio" / f"en_0001_0001_{n}.wav") for n in (1, 2, 3)]
    assert sum(lengths) == sum(len(t) for t in turns)
    kept = torch.cat([batch["raw_wav"][row, :n] for row, n in enumerate(lengths)]).numpy()
    np.testing.assert_array_equal(kept, np.concatenate(turns))
    assert batch["spectrogram"].shape == (4, 80, 3000)
    assert batch["prompt"][0].count(SPEECH_SLOT) == 3 and "Turn 3: <Speech>" in batch["prompt"][0]


def test_concat_mode_reproduces_the_original_cut_at_30_s(tmp_path, feature_extractor, caplog):
    ann = write_dialogue(tmp_path, [20.0, 12.0, 5.0])
    dataset = build_dataset(str(ann), {"turn_mode": "concat"}, "test", MODEL_CFG,
                            feature_extractor=feature_extractor)
    with caplog.at_level(logging.WARNING, logger="dataset_v1"):
        batch = collate([dataset[0]])
    assert batch["speech_slots"] == [[[0]]] and batch["raw_wav"].shape == (1, 30 * SAMPLE_RATE)
    assert batch["prompt"][0].count(SPEECH_SLOT) == 1
    gap = batch["raw_wav"][0, 20 * SAMPLE_RATE:20 * SAMPLE_RATE + SAMPLE_RATE // 2]
    assert gap.abs().max() == 0  # 0.5 s of silence between turns
    assert "cut to 30 s" in caplog.text and dataset.concat_cuts == 1


def test_collater_shapes_padding_masks_and_slot_offsets(tmp_path, feature_extractor):
    write_dialogue(tmp_path, [1.5, 2.5, 0.5], rates=[22050, 8000, 44100], dialogue_id="a")
    ann = write_dialogue(tmp_path, [3.0, 2.0, 1.0, 4.0], dialogue_id="b")
    dataset = build_dataset(str(ann), {}, "valid", MODEL_CFG, feature_extractor=feature_extractor)
    batch = collate([dataset[0], dataset[1]])
    expected = [1.5, 2.5, 1.0, 3.0, 2.0, 1.0, 4.0]  # the 0.5 s turn is padded to 1 s, as the original
    assert batch["spectrogram"].shape == (7, 80, 3000) and batch["spectrogram"].dtype == torch.float32
    assert batch["raw_wav"].shape == (7, 4 * SAMPLE_RATE) and batch["raw_wav"].dtype == torch.float32
    assert batch["padding_mask"].dtype == torch.bool
    for row, seconds in enumerate(expected):
        n = round(seconds * SAMPLE_RATE)
        assert not batch["padding_mask"][row, :n].any() and batch["padding_mask"][row, n:].all()
        assert batch["raw_wav"][row, n:].abs().sum() == 0
    assert batch["speech_slots"] == [[[0], [1], [2]], [[3], [4], [5], [6]]]
    assert batch["id"] == ["a", "b"] and batch["task"] == ["emotional_trajectory"] * 2
    assert batch["emotions"] == [["sad", "happy", "anger"], ["sad", "happy", "anger", "fear"]]
    assert batch["language"] == ["en", "en"] and batch["target"][0].startswith("You started")
    assert [p.count(SPEECH_SLOT) for p in batch["prompt"]] == [3, 4]


def test_text_inputs_choose_what_the_prompt_shows_and_never_the_target(tmp_path, feature_extractor):
    ann = write_dialogue(tmp_path, [1.0, 1.0, 1.0])

    def prompt(text_inputs: str) -> str:
        dataset = build_dataset(str(ann), {"text_inputs": text_inputs}, "test", MODEL_CFG,
                                feature_extractor=feature_extractor)
        return dataset[0]["prompt"]

    audio_only = prompt("audio")
    assert "words of turn" not in audio_only and "reply to turn" not in audio_only
    with_transcripts = prompt("audio+transcript")
    assert "Transcript: words of turn 3" in with_transcripts and "reply to turn" not in with_transcripts
    with_replies = prompt("audio+transcript+replies")
    assert "Assistant: reply to turn 1" in with_replies and "Assistant: reply to turn 2" in with_replies
    assert with_replies.count("Assistant:") == 2 and "You started" not in with_replies


def test_training_prompts_are_seeded_by_seed_epoch_and_index(tmp_path, feature_extractor):
    for i in range(6):
        ann = write_dialogue(tmp_path, [0.2, 0.2, 0.2], dialogue_id=f"d{i}")

    def prompts(seed: int, epoch: int, split: str = "train") -> list[str]:
        dataset = build_dataset(str(ann), {}, split, MODEL_CFG, seed=seed, feature_extractor=feature_extractor)
        dataset.set_epoch(epoch)
        return [dataset.dialogue_item(e, dataset.prompt_rng(i))["prompt"] for i, e in enumerate(dataset.annotation)]

    assert prompts(1, 0) == prompts(1, 0)  # a resumed run sees the same prompts
    assert prompts(1, 0) != prompts(1, 1) and prompts(1, 0) != prompts(2, 0)
    assert len(set(prompts(1, 0, "test"))) == 1 and prompts(1, 0, "test") == prompts(5, 3, "test")


def test_bad_configuration_fails_at_construction(tmp_path, feature_extractor):
    ann = write_dialogue(tmp_path, [1.0, 1.0])
    with pytest.raises(ValueError, match="turn_mode must be one of per_turn, concat"):
        build_dataset(str(ann), {"turn_mode": "joined"}, "train", MODEL_CFG, feature_extractor=feature_extractor)
    with pytest.raises(ValueError, match="use text_inputs: audio"):
        build_dataset(str(ann), {"turn_mode": "concat", "text_inputs": "audio+transcript"}, "train", MODEL_CFG,
                      feature_extractor=feature_extractor)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"asr": ["<Speech><SpeechHere></Speech> Transcribe."]}))
    with pytest.raises(PromptError, match="no prompt for task.*emotional_trajectory"):
        build_dataset(str(ann), {"prompt_path": str(prompts)}, "train", MODEL_CFG,
                      feature_extractor=feature_extractor)
    data = json.loads(ann.read_text())
    del data["annotation"][0]["turns"][1]["path"]
    ann.write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"annotation\[0\]: dialogue en_0001_0001, turn 2: missing key 'path'"):
        build_dataset(str(ann), {}, "train", MODEL_CFG, feature_extractor=feature_extractor)


# ------------------------------------------------------------------------------------------- original format
def test_single_clip_entries_fill_q_and_split_long_clips(tmp_path, feature_extractor):
    sf.write(str(tmp_path / "long.flac"), tone(35.0, 22050), 22050)
    sf.write(str(tmp_path / "short.wav"), tone(2.0, SAMPLE_RATE), SAMPLE_RATE)
    entries = [{"path": "long.flac", "text": "hello", "task": "asr"},
               {"path": "short.wav", "text": "a tone", "task": "QA", "Q": "What {is} this?"}]
    ann = tmp_path / "orig.json"
    ann.write_text(json.dumps({"annotation": entries}))
    dataset = build_dataset(str(ann), {}, "test", MODEL_CFG, feature_extractor=feature_extractor)
    batch = collate([dataset[0], dataset[1]])
    assert batch["speech_slots"] == [[[0, 1]], [[2]]]
    assert (~batch["padding_mask"]).sum(dim=1).tolist() == [30 * SAMPLE_RATE, 5 * SAMPLE_RATE, 2 * SAMPLE_RATE]
    assert batch["prompt"] == ["USER: <Speech><SpeechHere></Speech> Recognize the speech and give me the "
                               "transcription.\nASSISTANT:",
                               "USER: <Speech><SpeechHere></Speech> What {is} this?\nASSISTANT:"]
    assert batch["Q"] == ["", "What {is} this?"] and batch["emotions"] == [[], []]


def test_parity_clips_collate_like_the_original(tmp_path, feature_extractor):
    """The original dataset's batch of the two parity clips (tests/parity/inputs.safetensors)."""
    from safetensors.numpy import load_file
    reference = load_file(str(PARITY / "inputs.safetensors"))
    entries = [{"path": str(PARITY / "clip0_5.1s.wav"), "text": "x", "task": "emotion_recognition"},
               {"path": str(PARITY / "clip1_21.7s.wav"), "text": "y", "task": "QA",
                "Q": "What is the speaker doing?"}]
    ann = tmp_path / "parity.json"
    ann.write_text(json.dumps({"annotation": entries}))
    dataset = build_dataset(str(ann), {}, "test", MODEL_CFG, feature_extractor=feature_extractor)
    batch = collate([dataset[0], dataset[1]])
    np.testing.assert_array_equal(batch["padding_mask"].numpy(), reference["padding_mask"])
    np.testing.assert_array_equal(batch["raw_wav"].numpy(), reference["raw_wav_pcm16"] / 32768.0)
    np.testing.assert_allclose(batch["spectrogram"].numpy(), reference["spectrogram"], atol=1e-4)


# ------------------------------------------------------------------------------------------- make_batch, demo
def test_make_batch_from_files_with_a_plain_question_or_a_full_prompt(tmp_path, feature_extractor):
    paths = []
    for n, rate in enumerate([22050, 8000]):
        paths.append(str(tmp_path / f"turn{n}.wav"))
        sf.write(paths[-1], tone(1.2, rate), rate)
    text = ChatText(MODEL_CFG["llm_path"])
    batch = make_batch(paths, "How did my emotions change?", feature_extractor, text)
    assert batch["speech_slots"] == [[[0], [1]]] and batch["spectrogram"].shape == (2, 80, 3000)
    assert batch["prompt"][0].startswith("USER: Turn 1: <Speech><SpeechHere></Speech>\nTurn 2:")
    assert batch["prompt"][0].endswith("How did my emotions change?\nASSISTANT:")
    assert batch["input_ids"][0].tolist() == text.prompt_ids(batch["prompt"][0])[0] + text.end_ids
    full = "<Speech><SpeechHere></Speech> Describe it."
    assert make_batch(paths[:1], full, feature_extractor, text)["prompt"] == [f"USER: {full}\nASSISTANT:"]
    with pytest.raises(PromptError, match="1 <SpeechHere> slots for 2 audio file"):
        make_batch(paths, full, feature_extractor, text)


def test_demo_corpus_loads_through_the_demo_config(feature_extractor):
    from omegaconf import OmegaConf
    model_cfg = OmegaConf.load(ROOT / "configs" / "demo.yaml").model
    dataset = build_dataset(str(ROOT / "data" / "demo" / "ann" / "train.json"), OmegaConf.create({}), "train",
                            model_cfg, feature_extractor=feature_extractor)
    item = dataset[0]
    entry = dataset.annotation[0]
    assert len(item["slots"]) == len(entry["turns"]) == item["prompt"].count(SPEECH_SLOT)
    for clip, turn in zip(item["clips"], entry["turns"]):
        assert abs(len(clip) - max(SAMPLE_RATE, turn["duration"] * SAMPLE_RATE)) <= 2  # resampled, not cut


def test_audio_seconds_are_each_samples_decoded_duration(tmp_path, feature_extractor):
    """What group_by_length sorts by: read from headers, it must match the decoded audio (any rate)."""
    write_dialogue(tmp_path, [2.0, 7.5, 1.2], rates=[8000, 22050, 16000], dialogue_id="en_0001_0001")
    ann = write_dialogue(tmp_path, [3.0, 0.5, 4.0], dialogue_id="en_0001_0002")
    dataset = build_dataset(str(ann), {}, "train", MODEL_CFG, feature_extractor=feature_extractor)
    decoded = [sum(len(load_audio(turn["path"])) for turn in entry["turns"]) / SAMPLE_RATE
               for entry in dataset.annotation]
    np.testing.assert_allclose(dataset.audio_seconds(), decoded, atol=1e-3)
    np.testing.assert_allclose(decoded, [10.7, 7.5], atol=1e-3)

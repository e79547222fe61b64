"""turn_mode packed (a dialogue's turns end to end in shared encoder clips, each turn on its own Q-Former windows),
the speech tokens each turn mode gives with trim_speech_padding, and padding-free LLM batches (run.padding_free),
on the demo model (configs/demo.yaml: whisper_5s, a 5 s Whisper window of 14 windows of 0.34 s)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_real_size import without_dropout

from config import load_config
from dataset_v1 import build_dataset, collate, load_audio, load_feature_extractor, packed_clips, packed_layout
from models import SAMPLE_RATE, SPEECH_SLOT
from models.salmonn import IGNORE_INDEX, SALMONN

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"
WINDOW = 5440  # 17 Whisper frames of 320 samples: the spec's figures, to check the derived layout against
CLIP = 80000  # the demo's 5 s Whisper clip
# Turn lengths (samples) on the 5 s demo clip of 14 windows: 3 s crosses nothing, exactly 4 windows, 7 s (longer
# than a clip: crosses two clip boundaries), 0.05 s (one window), 2 s.
TURNS = [3 * SAMPLE_RATE, 4 * WINDOW, 7 * SAMPLE_RATE, 800, 2 * SAMPLE_RATE]


def demo_model_cfg(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(DEMO).model)
    cfg.update(lora_dropout=0.0, cache_frozen_encoders=False)
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def model() -> SALMONN:
    torch.manual_seed(0)
    return SALMONN.from_config(demo_model_cfg()).eval()


@pytest.fixture(scope="module")
def feature_extractor():
    return load_feature_extractor(ROOT / "assets/tiny/whisper_5s")


def noise(num_samples: int, seed: int) -> np.ndarray:
    """Audio with no zero samples, so that a lost or misplaced sample shows."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.05, 0.5, num_samples) * rng.choice([-1, 1], num_samples)).astype(np.float32)


def write_dialogues(folder: Path, dialogues: dict[str, list[int]], task: str = "emotional_trajectory") -> Path:
    """An annotation of dialogues (id -> turn lengths in samples), one exact float wav per turn."""
    entries = []
    for d, (dialogue_id, lengths) in enumerate(dialogues.items()):
        turns = []
        for n, length in enumerate(lengths, start=1):
            path = folder / f"{dialogue_id}_{n}.wav"
            sf.write(str(path), noise(length, seed=100 * d + n), SAMPLE_RATE, subtype="FLOAT")
            turns.append({"path": path.name, "emotion": "neutral"})
        entries.append({"id": dialogue_id, "task": task, "language": "en", "text": "You were calm throughout.",
                        "turns": turns})
    ann = folder / "ann.json"
    ann.write_text(json.dumps({"annotation": entries}))
    return ann


def packed_dataset(ann: Path, feature_extractor, **model_overrides):
    return build_dataset(str(ann), {"turn_mode": "packed"}, "test", demo_model_cfg(**model_overrides),
                         feature_extractor=feature_extractor)


def read_back(clips: list[np.ndarray], spans: list[tuple[int, int, int]], window: int) -> np.ndarray:
    return np.concatenate([clips[c][first * window:(first + n) * window] for c, first, n in spans])


def slot_embeddings(model: SALMONN, batch: dict) -> list[list[torch.Tensor]]:
    """Per sample, its speech tokens per slot, cut out of its LLM input by the text tokens around them."""
    with torch.no_grad():
        embeds, mask, _ = model._batch_sequences(batch, with_targets=False, left_pad=False)
    samples = []
    for b, positions in enumerate(batch["slot_positions"]):
        speech_so_far, slots = 0, []
        for position, slot in zip(positions, batch["speech_slots"][b]):
            size = sum(n for _, _, n in slot) * model.cfg["num_speech_query_token"]
            slots.append(embeds[b, position + speech_so_far:position + speech_so_far + size])
            speech_so_far += size
        assert speech_so_far + int(batch["prompt_lengths"][b]) == int(mask[b].sum())  # every token accounted for
        samples.append(slots)
    return samples


# ---------------------------------------------------------------------------------------------- the layout
def test_packed_windows_are_the_models_windows_in_samples(model, feature_extractor):
    window, per_clip = packed_layout(feature_extractor, model.cfg["second_per_window"], model.cfg["second_stride"])
    assert (window, per_clip) == (WINDOW, 14)  # 250 encoder frames // 17
    assert packed_layout(load_feature_extractor(ROOT / "assets/tiny/whisper"), 0.333333, 0.333333) == (WINDOW, 88)
    # the model's own view: encoder frames of a clip, its window kernel, and the windows encode_speech gives
    spectrogram = torch.from_numpy(feature_extractor([np.zeros(100)], sampling_rate=SAMPLE_RATE,
                                                     return_tensors="np").input_features)
    with torch.no_grad():
        frames = model.speech_encoder(spectrogram).last_hidden_state.shape[1]
    kernel, stride = model.window_size(frames, feature_extractor.n_samples / SAMPLE_RATE)
    assert kernel == stride and kernel * feature_extractor.n_samples // frames == window
    with torch.no_grad():  # no padding mask: nothing trimmed
        embeds, _ = model.encode_speech(spectrogram, torch.zeros(1, CLIP))
    assert embeds.shape[1] == per_clip * model.cfg["num_speech_query_token"]


def test_each_turn_gets_exactly_the_windows_that_hold_its_samples(feature_extractor):
    window, per_clip = packed_layout(feature_extractor, 0.333333, 0.333333)
    turns = [noise(n, seed=i) for i, n in enumerate(TURNS)]
    clips, slots = packed_clips(turns, window, per_clip)
    assert slots == [[(0, 0, 9)], [(0, 9, 4)], [(0, 13, 1), (1, 0, 14), (2, 0, 6)], [(2, 6, 1)], [(2, 7, 6)]]
    assert [len(c) for c in clips] == [per_clip * window, per_clip * window, 13 * window]
    assert all(len(c) <= feature_extractor.n_samples for c in clips)  # nothing in the frames past the last window
    used = np.zeros((len(clips), per_clip), dtype=int)
    for turn, spans in zip(turns, slots):
        assert sum(n for _, _, n in spans) == math.ceil(len(turn) / window)
        stream = [c * per_clip + first + k for c, first, n in spans for k in range(n)]
        assert stream == list(range(stream[0], stream[0] + len(stream)))  # in order, clip after clip
        for c, first, n in spans:
            used[c, first:first + n] += 1
        samples = read_back(clips, spans, window)
        np.testing.assert_array_equal(samples[:len(turn)], turn)  # every sample, in place
        assert not samples[len(turn):].any()  # the rest of the turn's last window is zeros
    assert used.max() == 1  # no window holds two turns
    assert sum(np.count_nonzero(c) for c in clips) == sum(TURNS)  # and the clips hold nothing else


def test_packed_dataset_batch_carries_spans_to_the_rows(tmp_path, feature_extractor):
    ann = write_dialogues(tmp_path, {"short": [SAMPLE_RATE, 2 * SAMPLE_RATE], "long": TURNS})
    dataset = packed_dataset(ann, feature_extractor)
    batch = collate([dataset[0], dataset[1]])
    assert batch["speech_slots"] == [[[(0, 0, 3)], [(0, 3, 6)]],
                                     [[(1, 0, 9)], [(1, 9, 4)], [(1, 13, 1), (2, 0, 14), (3, 0, 6)], [(3, 6, 1)],
                                      [(3, 7, 6)]]]
    assert batch["spectrogram"].shape == (4, 80, 500) and batch["raw_wav"].shape == (4, 14 * WINDOW)
    lengths = (~batch["padding_mask"]).sum(1).tolist()
    assert lengths == [9 * WINDOW, 14 * WINDOW, 14 * WINDOW, 13 * WINDOW]
    rows = [batch["raw_wav"][row, :n].numpy() for row, n in enumerate(lengths)]
    for b, entry in enumerate(dataset.annotation):
        for turn, spans in zip(entry["turns"], batch["speech_slots"][b]):
            wav = load_audio(turn["path"])
            np.testing.assert_array_equal(read_back(rows, spans, WINDOW)[:len(wav)], wav)
    assert "Turn 5: <Speech><SpeechHere></Speech>" in batch["prompt"][1]
    assert [p.count(SPEECH_SLOT) for p in batch["prompt"]] == [2, 5]


# ---------------------------------------------------------------------------------------------- the model
def direct_windows(model: SALMONN, batch: dict, row: int) -> torch.Tensor:
    """Every window of a clip row through Whisper + BEATs, the Q-Former and the projection, one window at a time,
    the clip alone: [windows, Q, D_llm]."""
    n = int((~batch["padding_mask"][row]).sum())
    with torch.no_grad():
        whisper = model.ln_speech(model.speech_encoder(batch["spectrogram"][row:row + 1]).last_hidden_state)
        beats, _ = model.beats(batch["raw_wav"][row:row + 1, :n], torch.zeros(1, n, dtype=torch.bool))
        beats = F.pad(model.ln_audio(beats), (0, 0, 0, max(0, whisper.shape[1] - beats.shape[1])))
        frames = torch.cat([whisper, beats[:, :whisper.shape[1]]], dim=-1)  # [1, T, Dw + Db]
        kernel = WINDOW * whisper.shape[1] // CLIP  # 17 frames
        return torch.cat([model.speech_llama_proj(model.speech_Qformer(
            query_embeds=model.speech_query_tokens,
            encoder_hidden_states=frames[:, w * kernel:(w + 1) * kernel]).last_hidden_state)
            for w in range(whisper.shape[1] // kernel)])


def test_a_turns_slot_is_its_windows_encoded_directly(tmp_path, model, feature_extractor):
    ann = write_dialogues(tmp_path, {"short": [SAMPLE_RATE // 2], "long": TURNS})
    dataset = packed_dataset(ann, feature_extractor)
    batch = collate([dataset[0], dataset[1]])
    windows = [direct_windows(model, batch, row) for row in range(len(batch["raw_wav"]))]
    for b, slots in enumerate(slot_embeddings(model, batch)):
        for got, slot in zip(slots, batch["speech_slots"][b]):
            expected = torch.cat([windows[row][first:first + n].flatten(0, 1) for row, first, n in slot])
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def sample_loss(model: SALMONN, batch: dict, b: int) -> torch.Tensor:
    """Sample b's mean target NLL, read from the batch's forward."""
    with torch.no_grad():
        logits = model(batch)["logits"][b]
        labels = model._batch_sequences(batch, with_targets=True, left_pad=False)[2][b, 1:]
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def test_packed_dialogue_does_not_depend_on_its_batch(tmp_path, model, feature_extractor):
    ann = write_dialogues(tmp_path, {"alone": [SAMPLE_RATE, 3 * SAMPLE_RATE // 2], "long": TURNS})
    dataset = packed_dataset(ann, feature_extractor)
    alone = collate([dataset[0]])
    together = collate([dataset[1], dataset[0]])  # the short dialogue second: its rows and spans move
    for got, expected in zip(slot_embeddings(model, together)[1], slot_embeddings(model, alone)[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        expected = model(alone)["loss"]
    torch.testing.assert_close(sample_loss(model, together, 1), expected, atol=1e-6, rtol=1e-6)


def test_cached_encoders_key_packed_clips_by_their_content(tmp_path, model, feature_extractor):
    ann = write_dialogues(tmp_path, {"long": TURNS})
    dataset = packed_dataset(ann, feature_extractor)
    item = dataset[0]
    batch = collate([item])
    torch.manual_seed(0)
    cached = SALMONN.from_config(demo_model_cfg(cache_frozen_encoders=True)).eval()
    runs = []
    cached.speech_encoder.register_forward_hook(lambda *_: runs.append(1))
    with torch.no_grad():
        first, _ = cached.encode_speech(batch["spectrogram"], batch["raw_wav"], batch["padding_mask"])
        again, _ = cached.encode_speech(batch["spectrogram"], batch["raw_wav"], batch["padding_mask"])
        expected, _ = model.encode_speech(batch["spectrogram"], batch["raw_wav"], batch["padding_mask"])
    digests = {hashlib.blake2b(clip.astype(np.float32).tobytes(), digest_size=16).digest() for clip in item["clips"]}
    assert set(cached.encoder_cache) == digests and len(digests) == 3  # one entry per packed clip, keyed by it
    assert len(runs) == len(digests)  # each clip encoded once: the second pass hit the cache
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, first)


def test_bad_packed_settings_are_clear_errors(tmp_path, model, feature_extractor):
    ann = write_dialogues(tmp_path, {"d": [SAMPLE_RATE]})
    with pytest.raises(ValueError, match=r"packed needs Q-Former windows that do not overlap: model.second_stride "
                                         r"\(0.2 s = 10 encoder frames\) must equal model.second_per_window"):
        packed_dataset(ann, feature_extractor, second_stride=0.2)
    with pytest.raises(ValueError, match="packed .* needs model.window_level_Qformer: true"):
        packed_dataset(ann, feature_extractor, window_level_Qformer=False)
    batch = collate([packed_dataset(ann, feature_extractor)[0]])
    beyond = {**batch, "speech_slots": [[[(0, 2, 5)]]]}  # the clip holds 3 windows of audio
    with pytest.raises(ValueError, match=r"span \(row 0, first window 2, 5 windows\) is not within the 3 windows"):
        model._batch_sequences(beyond, with_targets=False, left_pad=False)


# ---------------------------------------------------------------------------------------------- trimming, per mode
def expected_windows(lengths: list[int], mode: str, clip: int = CLIP) -> int:
    """Speech tokens (Q = 1) per the modes' rules, from the samples alone: a clip's windows are ceil(samples /
    5440), at most 14; per-turn clips are cut at 5 s and padded to >= 1 s; concat joins with 0.5 s gaps, cut at 5 s."""
    def clip_windows(n: int) -> int:
        return min(math.ceil(max(n, SAMPLE_RATE) / WINDOW), 14)

    if mode == "packed":
        return sum(math.ceil(n / WINDOW) for n in lengths)
    if mode == "concat":
        return clip_windows(min(sum(lengths) + (len(lengths) - 1) * SAMPLE_RATE // 2, clip))
    return sum(clip_windows(min(clip, n - start)) for n in lengths for start in range(0, n, clip))


@pytest.mark.parametrize("mode", ["per_turn", "concat", "packed", "single_clip"])
def test_trimmed_speech_tokens_per_turn_mode(tmp_path, model, feature_extractor, mode):
    lengths = [SAMPLE_RATE * 3 // 10, 2 * SAMPLE_RATE, 6 * SAMPLE_RATE]  # 0.3 s, 2 s, 6 s (longer than a clip)
    if mode == "single_clip":
        lengths = lengths[2:]
    ann = write_dialogues(tmp_path, {"d": lengths})
    if mode == "single_clip":  # the original format: one file, one slot
        entry = json.loads(ann.read_text())["annotation"][0]
        ann.write_text(json.dumps({"annotation": [{"path": entry["turns"][0]["path"], "text": "x", "task": "asr"}]}))
    turn_mode = "per_turn" if mode == "single_clip" else mode
    dataset = build_dataset(str(ann), {"turn_mode": turn_mode}, "test", demo_model_cfg(),
                            feature_extractor=feature_extractor)
    batch = collate([dataset[0]])
    with torch.no_grad():
        _, mask, _ = model._batch_sequences(batch, with_targets=False, left_pad=False)
    assert int(mask.sum()) - int(batch["prompt_lengths"][0]) == expected_windows(lengths, mode)
    assert expected_windows(lengths, mode) == {"per_turn": 3 + 6 + 14 + 3, "concat": 14, "packed": 1 + 6 + 18,
                                               "single_clip": 14 + 3}[mode]


def test_packed_slots_hold_only_the_turns_windows_untrimmed_too(tmp_path, feature_extractor):
    ann = write_dialogues(tmp_path, {"d": [SAMPLE_RATE * 3 // 10, 2 * SAMPLE_RATE]})
    batch = collate([packed_dataset(ann, feature_extractor)[0]])
    untrimmed = SALMONN.from_config(demo_model_cfg(trim_speech_padding=False)).eval()
    with torch.no_grad():
        _, mask, _ = untrimmed._batch_sequences(batch, with_targets=False, left_pad=False)
    assert int(mask.sum()) - int(batch["prompt_lengths"][0]) == 1 + 6  # of the clip's 14 windows


# ---------------------------------------------------------------------------------------------- padding-free
def loss_and_grads(model: SALMONN, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {k: out[k].detach() for k in ("loss", "loss_sum", "num_tokens", "correct")}, grads


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_gives_the_padded_loss_and_gradients(tmp_path, feature_extractor, attention):
    torch.manual_seed(0)
    model = without_dropout(SALMONN.from_config(demo_model_cfg()))
    model.llama_model.get_base_model().set_attn_implementation(attention)
    assert model.llama_model.get_base_model().model.layers[0].self_attn.config._attn_implementation == attention
    ann = write_dialogues(tmp_path, {"a": [SAMPLE_RATE], "b": [SAMPLE_RATE, 2 * SAMPLE_RATE],
                                     "c": [SAMPLE_RATE // 2, 3 * SAMPLE_RATE, SAMPLE_RATE]})
    dataset = build_dataset(str(ann), {}, "train", demo_model_cfg(), feature_extractor=feature_extractor)
    batch = collate([dataset[i] for i in range(3)])
    with torch.no_grad():
        seqs = model._sequences(batch, with_targets=True)
    assert len({len(e) for e, _ in seqs}) == 3  # unequal: the padded batch has padding
    padded, padded_grads = loss_and_grads(model, batch)
    model.padding_free = True
    try:
        free, free_grads = loss_and_grads(model, batch)
        with torch.no_grad():  # the test's power: one causal row without restarting positions is another loss
            embeds, _, labels = model._packed_row(seqs)
            logits = model.llama_model(inputs_embeds=embeds, use_cache=False).logits[0, :-1]
            leaky = F.cross_entropy(logits, labels[0, 1:], ignore_index=IGNORE_INDEX)
    finally:
        model.padding_free = False
    assert free["num_tokens"] == padded["num_tokens"] and free["correct"] == padded["correct"]
    torch.testing.assert_close(free["loss_sum"], padded["loss_sum"], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(free["loss"], padded["loss"], atol=1e-5, rtol=0)
    assert abs(float(leaky) - float(padded["loss"])) > 1e-3
    assert padded_grads.keys() == free_grads.keys() and any(".lora_B." in n for n in free_grads)
    for name in padded_grads:
        torch.testing.assert_close(free_grads[name], padded_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_runner_gives_the_model_run_padding_free(model):
    from runner import Runner
    from utils import DistInfo

    cfg = load_config(str(DEMO), ["run.padding_free=true"])
    try:
        Runner(cfg, model, {}, DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
        assert model.padding_free is True
    finally:
        model.padding_free = False
    assert load_config(str(DEMO)).run.padding_free is False

"""The tiny embedded default in assets/tiny: saved in the real models' formats, loaded through the same code as
the real ones, and exactly what scripts/make_tiny_assets.py builds from its seed."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, WhisperModel

from dataset_v1 import load_feature_extractor, make_batch
from models.beats import BEATs, BEATsConfig
from models.salmonn import SALMONN
from scripts import make_tiny_assets

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "assets/tiny"
CLIPS = [ROOT / "data/demo/audio/task1_5/en_0005_0033_1.ogg", ROOT / "data/demo/audio/task1_5/en_0005_0033_2.ogg"]
STALE = "assets/tiny differs from what the script builds: rerun python -m scripts.make_tiny_assets"
PROMPT = "<Speech><SpeechHere></Speech> Describe the emotion."  # the user's message: make_batch applies the template
TWO_TURNS = "Turn 1: <Speech><SpeechHere></Speech>\nTurn 2: <Speech><SpeechHere></Speech> How did I feel?"


def demo_model_cfg(config: str = "configs/demo.yaml", **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / config).model)
    for key in ("llm_path", "whisper_path", "beats_path", "prompt_path", "test_prompt_path"):
        cfg[key] = str(ROOT / cfg[key]) if cfg[key] else ""
    cfg.update({"lora_dropout": 0.0, "ckpt": "", **overrides})  # trained parts from their init unless a test loads some
    return cfg


def asset_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    assert make_tiny_assets.main(["--out", str(out)]) == 0
    return out


def test_whisper_folders_load_every_weight_through_from_pretrained():
    full, info = WhisperModel.from_pretrained(TINY / "whisper", local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    short, info = WhisperModel.from_pretrained(TINY / "whisper_5s", local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    assert full.config.init_std == 0.1 and full.config.max_source_positions == 1500
    assert short.config.max_source_positions == 250
    assert json.loads((TINY / "whisper_5s/preprocessor_config.json").read_text())["chunk_length"] == 5
    # the 5 s Whisper is the 30 s one with its position table cut: the same encoder on shorter clips
    long_state, short_state = full.state_dict(), short.state_dict()
    assert set(long_state) == set(short_state)
    positions = "encoder.embed_positions.weight"
    assert torch.equal(short_state[positions], long_state[positions][:250])
    assert all(torch.equal(short_state[k], v) for k, v in long_state.items() if k != positions)


def test_llama_folder_loads_every_weight_and_matches_its_tokenizer():
    llama, info = LlamaForCausalLM.from_pretrained(TINY / "llama", local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    assert llama.config.initializer_range == 0.1
    vocab = spm.SentencePieceProcessor(model_file=str(TINY / "llama/tokenizer.model")).get_piece_size()
    assert llama.get_input_embeddings().weight.shape[0] == llama.config.vocab_size == vocab
    assert llama.get_input_embeddings().weight.dtype == torch.float32


def test_beats_checkpoint_has_the_official_layout_and_loads_strictly():
    checkpoint = torch.load(TINY / "beats.pt", map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"cfg", "model", "label_dict"}
    assert set(checkpoint["cfg"]) == {f.name for f in dataclasses.fields(BEATsConfig)}
    assert len(checkpoint["label_dict"]) == checkpoint["cfg"]["predictor_class"]
    state = checkpoint["model"]
    assert {"encoder.pos_conv.0.weight_g", "encoder.pos_conv.0.weight_v"} <= set(state)
    tables = [state[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"]
              for i in range(checkpoint["cfg"]["encoder_layers"])]
    assert all(t.data_ptr() == tables[0].data_ptr() for t in tables)  # one table under every layer's name
    beats = BEATs.from_checkpoint(TINY / "beats.pt")
    encoder = {k: v for k, v in state.items() if not k.startswith("predictor.")}
    assert set(encoder) == set(beats.state_dict())  # nothing missing or unexpected but the skipped AudioSet head
    assert {k for k in state if k not in encoder} == {"predictor.weight", "predictor.bias"}
    assert all(torch.equal(beats.state_dict()[k], v) for k, v in encoder.items())


def saved_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of the BEATs checkpoint (its cfg and labels checked by equality)."""
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def config_json(path: Path) -> dict:
    """A saved JSON config without the transformers version that wrote it (the one field a newer one changes)."""
    config = json.loads(path.read_text())
    config.pop("transformers_version", None)
    return config


def test_assets_are_what_the_script_builds_from_its_seed(rebuilt):
    # the text it reads; the listening experiment's weights
    made_elsewhere = ("tokenizer_corpus.txt", "tokenizer_prompts.json", "salmonn_tiny.pth")
    assert asset_files(rebuilt) == [f for f in asset_files(TINY) if f not in made_elsewhere], STALE
    for name in asset_files(rebuilt):
        saved, built = TINY / name, rebuilt / name
        if name.endswith((".safetensors", ".pt")):
            saved_state, built_state = saved_tensors(saved), saved_tensors(built)
            assert set(saved_state) == set(built_state), f"{name}: {STALE}"
            assert all(torch.equal(v, built_state[k]) for k, v in saved_state.items()), f"{name}: {STALE}"
            assert all(v.dtype == torch.float32 for v in saved_state.values()), name
        elif name.endswith(".json"):
            assert config_json(saved) == config_json(built), f"{name}: {STALE}"
        else:
            assert saved.read_bytes() == built.read_bytes(), f"{name}: {STALE}"
    saved, built = (torch.load(d / "beats.pt", map_location="cpu", weights_only=True) for d in (TINY, rebuilt))
    assert saved["cfg"] == built["cfg"] and saved["label_dict"] == built["label_dict"], STALE


def test_the_script_writes_byte_identical_files_twice(rebuilt, tmp_path):
    assert make_tiny_assets.main(["--out", str(tmp_path)]) == 0
    assert asset_files(tmp_path) == asset_files(rebuilt)
    for name in asset_files(rebuilt):
        assert (tmp_path / name).read_bytes() == (rebuilt / name).read_bytes(), name
    # a different seed gives different weights: the seed, not something fixed, decides them
    other = make_tiny_assets.random_whisper(seed=7).state_dict()["encoder.conv1.weight"]
    assert not torch.equal(other, load_file(rebuilt / "whisper/model.safetensors")["encoder.conv1.weight"])


def test_the_assets_stay_small():
    sizes = {name: (TINY / name).stat().st_size for name in asset_files(TINY)}
    assert sum(sizes.values()) < 8 * 2**20, sizes


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/demo_learning.yaml"])
def test_demo_configs_load_the_saved_weights_and_hear_the_clips(config):
    cfg = demo_model_cfg(config)
    assert not cfg.get("random_init", False)  # the saved weights, as for the real models
    torch.manual_seed(0)
    model = SALMONN.from_config(cfg).eval()
    torch.manual_seed(1)
    again = SALMONN.from_config(cfg).eval()
    whisper = load_file(Path(cfg["whisper_path"]) / "model.safetensors")
    for name, value in model.speech_encoder.state_dict().items():  # the file's weights, whatever the torch seed
        assert torch.equal(value, whisper[f"encoder.{name}"]), name
    frozen = {"speech_encoder", "beats"}
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        if name.split(".")[0] in frozen or (name.startswith("llama_model.") and "lora_" not in name):
            assert torch.equal(a, b), name
    batch = make_batch([str(p) for p in CLIPS], TWO_TURNS, load_feature_extractor(cfg["whisper_path"]), model.text)
    assert batch["spectrogram"].shape[0] == 2  # one clip per file: both turns are shorter than the window
    with torch.no_grad():
        speech, audio, audio_pad = model.encoder_outputs(batch["spectrogram"], batch["raw_wav"], batch["padding_mask"])
    for features, pad in ((speech, None), (audio, audio_pad)):
        assert torch.isfinite(features).all()
        first, second = (features[i][~pad[i]] if pad is not None else features[i] for i in range(2))
        n = min(len(first), len(second))
        assert (first[:n] - second[:n]).abs().max() > 1e-2  # different clips, different features
        assert first.std(dim=0).mean() > 1e-2  # and the features change along the clip


def test_demo_config_loads_a_checkpoint_in_the_released_key_format(tmp_path):
    torch.manual_seed(0)
    trained = SALMONN.from_config(demo_model_cfg()).eval()
    with torch.no_grad():  # LoRA B starts at zero: give every trained tensor values so that a wrong load shows
        generator = torch.Generator().manual_seed(3)
        for p in trained.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    state = trained.trainable_state_dict()
    assert "speech_Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in state  # the released names
    assert not any(k.startswith(("speech_encoder.", "beats.")) for k in state)
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": state, "epoch": 0}, path)

    torch.manual_seed(1)  # another init of the trained parts: only the checkpoint can make them agree
    fresh = SALMONN.from_config(demo_model_cfg()).eval()
    torch.manual_seed(1)
    loaded = SALMONN.from_config(demo_model_cfg(ckpt=str(path))).eval()
    batch = make_batch([str(CLIPS[0])], PROMPT, load_feature_extractor(demo_model_cfg()["whisper_path"]),
                       trained.text)
    with torch.no_grad():
        expected, before, after = (m(batch)["logits"] for m in (trained, fresh, loaded))
    assert not torch.allclose(before, expected)
    assert torch.equal(after, expected)


def test_the_shipped_tiny_salmonn_checkpoint_is_in_the_released_format_and_loads_into_the_demo_model():
    ckpt = torch.load(TINY / "salmonn_tiny.pth", map_location="cpu", weights_only=True)
    assert set(ckpt) == {"model", "config", "step"} and ckpt["step"] == 2400
    assert any(k.startswith("speech_Qformer.bert.encoder.layer.0.crossattention.self.") for k in ckpt["model"])
    model = SALMONN.from_config(demo_model_cfg(ckpt=str(TINY / "salmonn_tiny.pth")))
    state = model.trainable_state_dict()
    assert set(state) == set(ckpt["model"]) and all(torch.equal(state[k], v) for k, v in ckpt["model"].items())

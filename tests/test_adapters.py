"""Adapters the ecosystem reads (adapters.py, scripts/export_adapter.py) and the LoRA merged at inference, on the
tiny demo model with its trained checkpoint: peft itself is the reference for what the exported folder computes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

import models.checkpoint as adapters
import train
from models.checkpoint import CheckpointError, CheckpointKeyError, export_adapter, load_adapter
from config import load_config
from dataset_v1 import build_dataset, collate
from inference import load_model
from models.salmonn import SALMONN
from scripts import export_adapter as export_script

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs/demo.yaml"
GREEDY = {"max_new_tokens": 12, "num_beams": 1, "do_sample": False}


@pytest.fixture(scope="module", autouse=True)
def in_repo_root():
    """configs/demo.yaml's paths are relative to the repository root."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        yield


def demo_model_cfg(**overrides) -> dict:
    return {**OmegaConf.to_container(OmegaConf.load(DEMO).model), **overrides}


@pytest.fixture(scope="module")
def source() -> SALMONN:
    return SALMONN.from_config(demo_model_cfg()).eval()


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> Path:
    return export_adapter(source, tmp_path_factory.mktemp("export") / "adapter", source="assets/tiny/salmonn_tiny.pth")


def assert_same_state(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


# ---------------------------------------------------------------------------------------------- export


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft <= 0.21
def test_peft_loads_the_adapter_onto_plain_llama_with_the_same_logits(source, exported):
    assert sorted(p.name for p in exported.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "connector.safetensors"]
    assert json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"] == "assets/tiny/llama"
    input_ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    llama = LlamaForCausalLM.from_pretrained("assets/tiny/llama").eval()
    with torch.no_grad():
        plain = llama(input_ids).logits
        peft_logits = PeftModel.from_pretrained(llama, exported).eval()(input_ids).logits
        ours = source.llama_model(input_ids).logits
    assert (ours - plain).abs().max() > 1e-2  # the trained LoRA changes the output: the comparison means something
    torch.testing.assert_close(peft_logits, ours, atol=1e-5, rtol=0)


def test_connector_holds_the_other_trained_tensors_under_the_original_names(source, exported):
    trained = source.trainable_state_dict()
    connector = load_file(exported / "connector.safetensors")
    assert_same_state(connector, {k: v for k, v in trained.items() if not k.startswith("llama_model.")})
    assert "speech_Qformer.bert.encoder.layer.0.crossattention.self.query.weight" in connector  # released naming
    assert {"speech_query_tokens", "speech_llama_proj.weight", "ln_speech.weight", "ln_audio.weight"} <= set(connector)
    with safe_open(exported / "connector.safetensors", framework="pt") as f:
        metadata = f.metadata()
    assert metadata["source"] == "assets/tiny/salmonn_tiny.pth"
    stored = json.loads(metadata["model_config"])
    assert stored["lora_rank"] == 16 and stored["qformer_hidden_size"] == 64 and len(stored["lora_target_modules"]) == 7


def test_export_refuses_a_filled_folder_and_leaves_nothing_when_it_fails(source, exported, tmp_path, monkeypatch):
    with pytest.raises(FileExistsError, match=str(exported)):
        export_adapter(source, exported, source="x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (export_adapter(source, empty, source="x") / "connector.safetensors").is_file()  # an empty folder is fine

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_adapter(source, tmp_path / "new", source="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no out_dir, no partial folder


def test_export_script(exported, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert export_script.cli(["--cfg-path", str(DEMO), "--out", str(out)]) == 0
    for name in ("adapter_model.safetensors", "connector.safetensors"):
        assert_same_state(load_file(out / name), load_file(exported / name))
    capsys.readouterr()
    assert export_script.cli(["--cfg-path", str(DEMO), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and str(out) in err
    assert export_script.cli(["--cfg-path", str(DEMO), "--out", str(tmp_path / "b"), "--options", "model.ckpt="]) == 2
    assert "no checkpoint to export" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- load


def test_load_adapter_gives_the_source_models_trained_tensors(source, exported):
    fresh = SALMONN(demo_model_cfg(ckpt=""))
    assert not torch.equal(fresh.speech_query_tokens, source.speech_query_tokens)
    load_adapter(fresh, exported)
    assert_same_state(fresh.trainable_state_dict(), source.trainable_state_dict())


def test_model_ckpt_accepts_the_folder(source, exported):
    model = SALMONN.from_config(demo_model_cfg(ckpt=str(exported)))
    assert_same_state(model.trainable_state_dict(), source.trainable_state_dict())


def test_a_missing_file_is_named(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    (folder / "connector.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"connector\.safetensors missing") as e:
        SALMONN.from_config(demo_model_cfg(ckpt=str(folder)))
    assert str(folder) in str(e.value)


def test_another_lora_rank_is_named(exported):
    model = SALMONN(demo_model_cfg(ckpt="", lora_rank=8))
    with pytest.raises(CheckpointError, match=r"adapter_config\.json' describes another LoRA: r=16 \(this model: 8\)"):
        load_adapter(model, exported)


def tamper(folder: Path, name: str, change) -> None:
    tensors = load_file(folder / name)
    with safe_open(folder / name, framework="pt") as f:
        metadata = f.metadata()
    change(tensors)
    save_file(tensors, folder / name, metadata=metadata)


LORA_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # peft's name in adapter_model


@pytest.mark.parametrize("name, change, error, message", [
    ("connector.safetensors", lambda t: t.update(speech_query_tokens=torch.zeros(1, 2, 64)), CheckpointError,
     r"'speech_query_tokens' has shape \(1, 2, 64\) in the checkpoint but \(1, 1, 64\) in the model"),
    ("adapter_model.safetensors", lambda t: t.pop(LORA_KEY), CheckpointKeyError,
     r"1 trained tensors are missing, e.g. \['llama_model\.base_model\.model\.model\.layers\.0\.self_attn\.q_proj"),
    ("connector.safetensors", lambda t: t.update(extra=torch.zeros(1)), CheckpointKeyError,
     r"1 keys match no tensor of this model, e.g. \['extra'\]"),
])
def test_a_missing_extra_or_mis_shaped_tensor_is_named(exported, tmp_path, name, change, error, message):
    folder = copy_of(exported, tmp_path)
    tamper(folder, name, change)
    with pytest.raises(error, match=message) as e:
        load_adapter(SALMONN(demo_model_cfg(ckpt="")), folder)
    assert str(e.value).startswith(str(folder))


# ---------------------------------------------------------------------------------------------- merge


def demo_cfg(*options: str):
    return load_config([str(DEMO)], list(options))


@pytest.fixture(scope="module")
def batch() -> dict:
    cfg = demo_cfg()
    dataset = build_dataset(cfg.datasets.train_ann_path, cfg.datasets, "train", cfg.model, seed=cfg.run.seed)
    return collate([dataset[i] for i in range(2)])


@pytest.mark.parametrize("lora_scaling", [None, 0.5])
def test_merged_lora_gives_the_same_logits_and_answers(batch, lora_scaling):
    unmerged = load_model(demo_cfg(), torch.device("cpu"), lora_scaling)
    merged = load_model(demo_cfg("model.merge_lora=true"), torch.device("cpu"), lora_scaling)
    assert isinstance(merged.llama_model, LlamaForCausalLM)
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        logits = unmerged(batch)["logits"]
        merged_logits = merged(batch)["logits"]
    # W x + B A x against (W + B A) x: fp32 rounding, measured 1.5e-5 on logits up to 13 (~1e-6 of their range)
    torch.testing.assert_close(merged_logits, logits, atol=5e-5, rtol=0)
    answers = unmerged.generate(batch, GREEDY)
    assert all(answers) and merged.generate(batch, GREEDY) == answers
    unmerged.set_lora_scaling(0.0)
    with torch.no_grad():
        assert (unmerged(batch)["logits"] - merged_logits).abs().max() > 1e-2  # the merge kept the LoRA's effect


def test_a_merged_model_is_not_trained_scaled_or_saved(tmp_path, capsys):
    merged = load_model(demo_cfg("model.merge_lora=true"), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="merged .* cannot be trained"):
        merged.train()
    with pytest.raises(RuntimeError, match="merged"):
        merged.trainable_state_dict()
    with pytest.raises(RuntimeError, match="merged"):
        export_adapter(merged, tmp_path / "adapter", source="x")
    with pytest.raises(ValueError, match="merged .* set lora_scaling before merging"):
        merged.set_lora_scaling(1.0)
    with pytest.raises(ValueError, match="no LoRA to merge"):
        merged.merge_lora()
    capsys.readouterr()
    assert train.cli(["--cfg-path", str(DEMO), "--options", "model.merge_lora=true",
                      f"run.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model.merge_lora: true is for inference")
    assert not (tmp_path / "run").exists()


def test_a_folder_checkpoint_has_a_fingerprint_that_follows_its_files(exported, tmp_path):
    """A decode records the checkpoint it came from: for an adapter folder, a digest over its files."""
    from utils import file_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    before = file_fingerprint(copy)
    assert before["sha256"] == file_fingerprint(exported)["sha256"]
    assert before["bytes"] == sum(p.stat().st_size for p in copy.iterdir())
    (copy / "adapter_config.json").write_text((copy / "adapter_config.json").read_text() + " ")
    assert file_fingerprint(copy)["sha256"] != before["sha256"]

"""memory_plan.py against independent counts: parameter counts against SALMONN-7B / 13B built on the meta device;
what the plan says autograd keeps for the backward against what it keeps in a small LLaMA with peft LoRA (saved
tensors, deduplicated by storage, and the storages still alive after the forward) and in SALMONN's speech side at
the real Q-Former width; the sequence layout against the dataset's own clip and window rules."""
from __future__ import annotations

import json
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaModel

from tools import memory_plan as mp
from models import MODEL_DEFAULTS
from dataset_v1 import load_feature_extractor, make_batch, packed_clips, packed_layout, per_turn_clips
from models import SAMPLE_RATE
from tools.real_size import (BEATS_CPT2, WHISPER_FEATURES, WHISPER_LARGE_V2, released_model_config,
                              write_config_folders)
from models.salmonn import SALMONN
from scripts import memory_plan as cli

ROOT = Path(__file__).resolve().parents[1]
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_AUTOCAST = mp.Precision("bfloat16", autocast=True, device="cpu")  # the GPU recipe's arithmetic, CPU masks
# peft (<= 0.21) reads transformers' deprecated is_gradient_checkpointing when it wraps a model
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


# ------------------------------------------------------------------------------------------- parameter counts
@pytest.fixture(scope="module")
def meta_models(tmp_path_factory) -> dict[str, SALMONN]:
    folders = write_config_folders(tmp_path_factory.mktemp("real"))
    models = {}
    for size in ("7b", "13b"):
        with torch.device("meta"):
            models[size] = SALMONN(released_model_config(folders, size))
    return models


def numel(module: torch.nn.Module, keep=lambda name: True) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if keep(n))


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_parameter_counts_are_those_of_the_model_built_on_meta(meta_models, size):
    model, s = meta_models[size], mp.released_shape(size)
    assert numel(model.speech_encoder) == mp.whisper_parameters(s.whisper)
    assert numel(model.beats) == mp.beats_parameters(s.beats)
    assert numel(model.llama_model, lambda n: ".lora_" not in n) == mp.llm_parameters(s.llm)
    assert numel(model.llama_model, lambda n: ".lora_" in n) == mp.lora_parameters(s.llm, s.lora)
    trained = mp.trained_parameters(s)
    assert numel(model.speech_Qformer) + model.speech_query_tokens.numel() == trained["qformer"]
    assert numel(model.speech_llama_proj) == trained["projection"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(trained.values())
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert frozen == mp.frozen_weight_bytes(s)  # in the dtypes the model keeps them (BEATs fp32)


def test_the_released_sizes():
    assert sum(mp.trained_parameters(mp.released_shape("13b")).values()) == 33_332_992
    assert sum(mp.trained_parameters(mp.released_shape("7b")).values()) == 30_186_240


# ---------------------------------------------------------------------------------- what the backward keeps
class LiveStorages(TorchDispatchMode):
    """Every storage an op creates while `active` is set, weakly referenced: those still alive later are what
    the forward left behind (saved for the backward or held by checkpointing), whoever holds them."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.active, self.created = skip, False, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.skip:
                    storage = t.untyped_storage()
                    known = self.created.get(storage.data_ptr())
                    if known is None or known[0]() is not storage:  # a freed storage's address may be reused
                        self.created[storage.data_ptr()] = (weakref.ref(storage), storage.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(size for ref, size in self.created.values() if ref() is not None)


class SavedTensors:
    """Bytes of the tensors autograd saves while `active`, one count per storage, parameters left out."""

    def __init__(self, skip: set[int]):
        self.skip, self.active, self.storages = skip, False, {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if self.active and storage.data_ptr() not in self.skip:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def bytes(self) -> int:
        return sum(self.storages.values())


def storages_of(module: torch.nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}


def enable_checkpointing(llama: torch.nn.Module) -> None:
    enable = getattr(llama, "activation_checkpointing_enable", None) or llama.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def small_lora_llama(llm: mp.Llm, lora: mp.Lora, weights: str) -> torch.nn.Module:
    config = LlamaConfig(hidden_size=llm.hidden, intermediate_size=llm.intermediate, num_hidden_layers=llm.layers,
                         num_attention_heads=llm.heads, num_key_value_heads=llm.kv_heads, vocab_size=llm.vocab)
    model = LlamaForCausalLM(config).to(getattr(torch, weights))
    for p in model.parameters():
        p.requires_grad = False
    return get_peft_model(model, LoraConfig(r=lora.rank, lora_alpha=32, lora_dropout=lora.dropout,
                                            target_modules=list(lora.targets)))


def decoder_stack_counts(llm: mp.Llm, lora: mp.Lora, p: mp.Precision, tokens: int,
                         checkpointing: bool) -> tuple[int, int]:
    """(bytes saved inside the decoder stack, bytes created from the stack's input on and still alive when the
    backward starts, after autocast has dropped its cache) for one sequence whose input comes from a trained
    projection, as SALMONN's speech tokens do."""
    torch.manual_seed(0)
    model = small_lora_llama(llm, lora, p.weights)
    if checkpointing:
        enable_checkpointing(model.get_base_model())
    model.train()
    projection = torch.nn.Linear(32, llm.hidden)
    skip = storages_of(model) | storages_of(projection)
    saved, live = SavedTensors(skip), LiveStorages(skip)
    stack = next(m for m in model.modules() if isinstance(m, LlamaModel))

    def stop(*_):
        saved.active = live.active = False

    hook = stack.register_forward_hook(stop)
    embeds = projection(torch.randn(1, tokens, 32))  # [1, T, h], requires grad
    with live, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        saved.active = live.active = True
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.autocast):
            # the stack's input, made here (SALMONN stacks its sequences into a new tensor too)
            logits = model(inputs_embeds=embeds.to(getattr(torch, p.weights), copy=True), use_cache=False).logits
    hook.remove()
    alive = live.alive_bytes()
    logits.float().sum().backward()  # a real training graph: the LoRA gets its gradients
    assert all(p.grad is not None for n, p in model.named_parameters() if ".lora_" in n)
    return saved.bytes(), alive


LLM_CASES = [  # precision, LLM (hidden, intermediate, layers, heads), tokens, LoRA targets, dropout
    pytest.param(CPU_AUTOCAST, mp.Llm(256, 688, 2, 4, 4, 512), 96, ("q_proj", "v_proj"), 0.1, id="bf16-autocast"),
    pytest.param(mp.CPU_BF16, mp.Llm(192, 512, 3, 6, 6, 512), 160, ("q_proj", "v_proj"), 0.1, id="bf16"),
    pytest.param(mp.CPU_FP32, mp.Llm(128, 256, 2, 4, 4, 512), 64, ALL_TARGETS, 0.0, id="fp32-demo-lora"),
]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-gc", "gc"])
@pytest.mark.parametrize("precision, llm, tokens, targets, dropout", LLM_CASES)
def test_llm_activations_are_what_autograd_keeps(precision, llm, tokens, targets, dropout, checkpointing):
    lora = mp.Lora(8, targets, dropout)
    saved, alive = decoder_stack_counts(llm, lora, precision, tokens, checkpointing)
    predicted = mp.llm_saved_bytes(llm, lora, precision, tokens, 1, checkpointing)
    if precision.autocast and not checkpointing:  # autocast's cached bf16 LoRA weights, saved by the matmuls
        predicted += 2 * mp.lora_parameters(llm, lora)
    assert alive == pytest.approx(predicted, rel=0.15)
    if not checkpointing:  # checkpointing keeps the layer inputs outside autograd's saved tensors
        assert saved == pytest.approx(predicted, rel=0.15)
    else:
        assert alive < mp.llm_saved_bytes(llm, lora, precision, tokens, 1, False) / 4


def test_the_per_layer_formula_at_13b():
    s = mp.released_shape("13b")
    h, i, r = 5120, 13824, 8
    assert mp.llm_layer_bytes_per_token(s.llm, s.lora, mp.GPU_BF16) == 8 * h + 8 + 8 * h + 4 * 40 + 6 * i + 2 * (
        3 * h + 2 * r)


# ------------------------------------------------------------------------------------------- the speech side
@pytest.fixture(scope="module")
def speech_folders(tmp_path_factory) -> dict[str, Path]:
    """Encoders of the real width with one layer and 3 s clips (the Q-Former sees 1280 + 768 channels as at
    full size), a tiny LLaMA."""
    root = tmp_path_factory.mktemp("speech")
    whisper = root / "whisper"
    whisper.mkdir()
    (whisper / "config.json").write_text(json.dumps({**WHISPER_LARGE_V2, "encoder_layers": 1, "decoder_layers": 1,
                                                     "max_source_positions": 150}))
    (whisper / "preprocessor_config.json").write_text(json.dumps(
        {**WHISPER_FEATURES, "chunk_length": 3, "n_samples": 3 * SAMPLE_RATE, "nb_max_frames": 300}))
    (root / "beats.json").write_text(json.dumps({**BEATS_CPT2, "encoder_layers": 1}))
    llama = root / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=128, intermediate_size=256,
                                                       num_hidden_layers=1, num_attention_heads=4, vocab_size=1200)))
    shutil.copy(ROOT / "assets/tiny/llama/tokenizer.model", llama)
    for n, seconds in enumerate((2.5, 1.2)):
        sf.write(root / f"turn{n}.wav", np.random.default_rng(n).normal(0, 0.1, int(seconds * SAMPLE_RATE)),
                 SAMPLE_RATE)
    return {"root": root, "whisper": whisper, "beats": root / "beats.json", "llama": llama}


@pytest.mark.parametrize("precision", [CPU_AUTOCAST, mp.CPU_FP32], ids=["bf16-autocast", "fp32"])
@pytest.mark.parametrize("trim", [False, True], ids=["untrimmed", "trimmed"])
def test_speech_side_is_what_autograd_keeps(speech_folders, precision, trim):
    f = speech_folders
    model_cfg = {**MODEL_DEFAULTS, "llm_path": str(f["llama"]), "whisper_path": str(f["whisper"]),
                 "beats_path": str(f["beats"]), "random_init": True, "torch_dtype": precision.weights,
                 "trim_speech_padding": trim}
    torch.manual_seed(0)
    model = SALMONN(model_cfg).train()
    batch = make_batch([str(f["root"] / "turn0.wav"), str(f["root"] / "turn1.wav")], "Describe it.",
                       load_feature_extractor(f["whisper"]), model.text)
    saved = SavedTensors(storages_of(model))
    saved.active = True
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.autocast)
    with autocast, torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        embeds, atts = model.encode_speech(batch["spectrogram"], batch["raw_wav"], batch["padding_mask"])

    s = mp.SalmonnShapes.from_configs(model_cfg, json.loads((f["llama"] / "config.json").read_text()),
                                json.loads((f["whisper"] / "config.json").read_text()), 3.0,
                                json.loads(f["beats"].read_text()))
    windows = sum(mp.kept_windows(s, t) for t in (2.5, 1.2)) if trim else 2 * s.windows_per_clip
    assert int(atts.sum()) == windows * s.qformer.queries
    predicted = mp.speech_saved_bytes(s, precision, clips=2, windows=windows, patches=mp.beats_patches(s.beats, 2.5))
    if precision.autocast:  # autocast's cached bf16 copies of the Q-Former and projection weights
        predicted += 2 * (sum(mp.trained_parameters(s).values()) - mp.lora_parameters(s.llm, s.lora))
    assert saved.bytes() == pytest.approx(predicted, rel=0.15)


# ------------------------------------------------------------------------------------------------- layouts
def test_layouts_follow_the_dataset_rules():
    s = mp.released_shape("7b")
    fe = load_feature_extractor(ROOT / "assets/tiny/whisper")  # a 30 s window, as whisper-large-v2's
    seconds = [4.0, 2.5, 31.0, 7.3]
    wavs = [np.zeros(round(t * SAMPLE_RATE), dtype=np.float32) for t in seconds]
    d = {mode: mp.layout(s, mp.Dialogue(tuple(seconds), mode)) for mode in mp.MODES}

    clips, _ = per_turn_clips(wavs, fe.n_samples)
    assert d["per_turn"].clips == d["per_turn_trimmed"].clips == len(clips) == 5  # 31 s is two clips
    assert d["per_turn"].speech_tokens == 5 * 88
    num_samples = torch.tensor([len(c) for c in clips])
    kept = SALMONN.num_windows(num_samples, 50.0, s.window[1], s.windows_per_clip)
    assert d["per_turn_trimmed"].speech_tokens == d["per_turn_trimmed"].qformer_windows == int(kept.sum())

    window_samples, per_clip = packed_layout(fe, s.window_seconds, s.stride_seconds)
    packed, slots = packed_clips(wavs, window_samples, per_clip)
    assert d["packed"].clips == len(packed)
    assert d["packed"].speech_tokens == sum(count for turn in slots for _, _, count in turn)
    assert d["concat"].clips == 1 and d["concat"].speech_tokens == 88
    for lay in d.values():
        assert lay.prompt_tokens == lay.speech_tokens + (40 if lay is d["concat"] else 40 + 12 * 4)


# ----------------------------------------------------------------------------------------- plans and the CLI
def test_plans_move_the_right_way():
    s, d = mp.released_shape("13b"), mp.Dialogue.uniform(5, 4.0)
    peak = {(b, gc, st): mp.training_plan(s, d, b, gc, 4 if st == "fsdp" else 1, st).allocated
            for b in (1, 2, 4) for gc in (False, True) for st in ("ddp", "fsdp")}
    for b in (1, 2, 4):
        assert peak[b, True, "ddp"] < peak[b, False, "ddp"] and peak[b, False, "fsdp"] < peak[b, False, "ddp"]
    assert peak[1, False, "ddp"] < peak[2, False, "ddp"] < peak[4, False, "ddp"]
    packed = mp.training_plan(s, mp.Dialogue.uniform(5, 4.0, "packed"), 4).allocated
    assert packed < peak[4, False, "ddp"]
    plan = mp.training_plan(s, d, 2)
    assert plan.allocated >= mp.frozen_weight_bytes(s) + 16 * sum(mp.trained_parameters(s).values())
    assert plan.device > plan.allocated
    kv = mp.inference_plan(s, d, 8, 4, 200).items["KV cache, prompt + answer"]
    assert kv == 2 * 40 * 5120 * (540 + 200) * 8 * 4 * 2
    cpu = mp.predict_cpu_step("7b")
    assert cpu.device == cpu.allocated == sum(cpu.items.values()) and not cpu.outside_allocator


def test_table_has_every_configuration():
    table = mp.table_markdown().splitlines()
    assert table[0].split(" | ")[-4:] == ["A100-40", "A100-80", "H100-80", "4 x A40-46 |"]
    rows = table[2:]
    assert len(rows) == 4 * (3 * 2 * 2 * 2 + 2)  # LLMs x (batch x audio x GC x strategy + 2 inference rows)
    assert sum("infer" in r for r in rows) == 8 and sum("FSDP x 4" in r for r in rows) == 48
    assert {r.split(" | ")[0].strip("| ") for r in rows} == {"7b", "13b", "qwen2.5-7b", "qwen3-8b"}


def test_cli_prints_itemised_plans(capsys):
    assert cli.main(["--llm", "7b", "--batch", "2", "--gradient-checkpointing", "both"]) == 0
    out = capsys.readouterr().out
    assert out.count("<- peak") == 2 and "GC off" in out and "GC on" in out and "AdamW" in out
    assert cli.main(["--llm", "13b", "--infer", "--beams", "2"]) == 0
    assert "KV cache" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["--strategy", "fsdp", "--gpus", "1"])
    assert "--gpus 2 or more" in capsys.readouterr().err

"""The real-size model without a GPU: gradient checkpointing proven on the tiny demo model (same loss and
gradients, LoRA still trained, generation still cached), and Vicuna-13B / 7B SALMONN built on the meta device
(nothing allocated) to check that the released checkpoints' key sets map one to one, with shapes, onto ours."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_runner import corpus_options, make_corpus, run_train, train_losses
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

import train
from dataset_v1 import build_dataset, collate
from tools.real_size import QWEN, VICUNA, released_model_config, write_config_folders
from models.checkpoint import CheckpointError, load_trainable_state_dict, to_original_name
from models.salmonn import SALMONN

ROOT = Path(__file__).resolve().parents[1]
PARITY_KEYS = ROOT / "tests/parity/checkpoint_keys.json"  # written by the ORIGINAL code (tests/parity/README.md)
LLAMA_LAYER = re.compile(r"^(llama_model\.base_model\.model\.model\.layers\.)\d+(\..*)$")

# ------------------------------------------------------------------------------------------ gradient checkpointing


def without_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Train mode with every dropout off, so that two forwards of one batch compute the same function."""
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@pytest.fixture(scope="module")
def demo_model_and_batch() -> tuple[SALMONN, dict]:
    cfg = OmegaConf.load(ROOT / "configs/demo.yaml")
    model_cfg = OmegaConf.to_container(cfg.model)
    model_cfg.update(lora_dropout=0.0, cache_frozen_encoders=False)  # demo ckpt kept: LoRA B is not zero
    torch.manual_seed(0)
    model = without_dropout(SALMONN.from_config(model_cfg))
    dataset = build_dataset(str(ROOT / cfg.datasets.train_ann_path), cfg.datasets, "train", model_cfg)
    return model, collate([dataset[i] for i in range(2)])


def loss_and_grads(model: SALMONN, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """The batch's loss, the gradient of every trained tensor, and how many elements autograd kept for the
    backward pass inside the LLM's decoder stack (what checkpointing saves)."""
    kept, inside = [], []
    stack = next(m for m in model.llama_model.modules() if isinstance(m, LlamaModel))
    hooks = [stack.register_forward_pre_hook(lambda *_: inside.append(True)),
             stack.register_forward_hook(lambda *_: inside.clear())]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if inside:
            kept.append(tensor.numel())
        return tensor

    model.zero_grad(set_to_none=True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(batch)["loss"]
    finally:
        for hook in hooks:
            hook.remove()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, sum(kept)


def llama_calls(model: SALMONN) -> tuple[list[dict], torch.utils.hooks.RemovableHandle]:
    """Hooks the decoder stack (LlamaModel): per call, its input length and whether it returned a KV cache."""
    calls: list[dict] = []

    def record(module, args, kwargs, output):
        inputs = kwargs.get("inputs_embeds")
        inputs = kwargs["input_ids"] if inputs is None else inputs
        calls.append({"length": inputs.shape[1], "cache": output.cache is not None})

    stack = next(m for m in model.llama_model.modules() if isinstance(m, LlamaModel))
    return calls, stack.register_forward_hook(record, with_kwargs=True)


def checkpointed_layers(model: SALMONN) -> list[bool]:
    return [m.gradient_checkpointing for m in model.modules() if isinstance(m, LlamaDecoderLayer)]


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(demo_model_and_batch):
    model, batch = demo_model_and_batch
    assert checkpointed_layers(model) == [False, False]
    loss, grads, kept = loss_and_grads(model, batch)
    calls, hook = llama_calls(model)
    model.enable_gradient_checkpointing()
    assert checkpointed_layers(model) == [True, True]
    try:
        checkpointed_loss, checkpointed_grads, checkpointed_kept = loss_and_grads(model, batch)
    finally:
        hook.remove()
        model.llama_model.get_base_model().activation_checkpointing_disable()
    assert calls == [{"length": calls[0]["length"], "cache": False}]  # one training forward, no KV cache
    assert checkpointed_kept < kept / 4  # the layers keep their inputs only (measured 0.2M vs 3.0M elements)
    torch.testing.assert_close(checkpointed_loss, loss, atol=1e-6, rtol=0)
    assert checkpointed_grads.keys() == grads.keys()
    lora = [n for n in grads if ".lora_A." in n or ".lora_B." in n]
    assert len(lora) == 2 * 7 * 2  # 2 layers x 7 target modules x (A, B)
    for name in lora:
        assert checkpointed_grads[name].abs().sum() > 0, f"{name}: no gradient through the checkpointed LLM"
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=0, msg=name)


def test_generation_with_gradient_checkpointing_uses_the_kv_cache(demo_model_and_batch):
    model, batch = demo_model_and_batch
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "num_beams": 1, "do_sample": False}
    plain = model.generate(batch, settings)
    model.enable_gradient_checkpointing()
    calls, hook = llama_calls(model)
    try:
        assert model.training  # the layers check training mode: generation must not be checkpointed either way
        checkpointed = model.generate(batch, settings)
    finally:
        hook.remove()
        model.llama_model.get_base_model().activation_checkpointing_disable()
    assert checkpointed == plain
    assert len(calls) == 5 and all(c["cache"] for c in calls)
    assert calls[0]["length"] > 1 and [c["length"] for c in calls[1:]] == [1] * 4  # one new token per step


def test_training_run_with_gradient_checkpointing(tmp_path, monkeypatch):
    """A train.py run with run.gradient_checkpointing=true: it trains the LLM checkpointed, and its losses are
    those of the same run without."""
    corpus = make_corpus(tmp_path / "corpus", num_train=4, num_valid=2, num_test=2)
    built: list[SALMONN] = []
    build = train.build_model
    monkeypatch.setattr(train, "build_model", lambda cfg: built.append(build(cfg)) or built[-1])
    losses = {}
    for checkpointing in (False, True):
        out = tmp_path / f"gc_{checkpointing}"
        options = corpus_options(corpus, out, iters_per_epoch=2, optims__max_epoch=1,
                                 gradient_checkpointing=checkpointing)
        assert run_train(options) == 0
        losses[checkpointing] = train_losses(out)
    assert checkpointed_layers(built[0]) == [False, False] and checkpointed_layers(built[1]) == [True, True]
    assert [s for s, _ in losses[True]] == [1, 2]
    for (_, plain), (_, checkpointed) in zip(losses[False], losses[True]):
        assert checkpointed == pytest.approx(plain, abs=1e-6)


# ------------------------------------------------------------------------------- 13B / 7B on the meta device

LLAMA_PARAMETERS = {"13b": 13_015_864_320, "7b": 6_738_415_616}  # LLaMA's published parameter counts


def llama_size(size: str) -> tuple[int, int]:
    """hidden size and layer count of the Vicuna release"""
    return VICUNA[size]["hidden_size"], VICUNA[size]["num_hidden_layers"]


@pytest.fixture(scope="module")
def real_configs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Config-only folders (no weights) of whisper-large-v2, BEATs cpt2 and Vicuna-13B / 7B."""
    return write_config_folders(tmp_path_factory.mktemp("real_size"))


def build_on_meta(folders: dict[str, Path], size: str) -> SALMONN:
    """The released setting at real size, its tensors on the meta device: shapes without memory."""
    with torch.device("meta"):
        return SALMONN(released_model_config(folders, size))


@pytest.fixture(scope="module")
def meta_models(real_configs) -> dict[str, SALMONN]:
    return {size: build_on_meta(real_configs, size) for size in VICUNA}


def released_keys(num_llama_layers: int) -> set[str]:
    """The trained-tensor keys of a released checkpoint: those the original code wrote for its tiny model, with
    the LLaMA layer count changed (the Q-Former has 2 layers in both)."""
    entries = json.loads(PARITY_KEYS.read_text())["model"]
    keys = set()
    for key in (e["key"] for e in entries if e["kind"] == "parameter"):  # buffers and BEATs aliases are not trained
        match = LLAMA_LAYER.match(key)
        keys |= {f"{match[1]}{n}{match[2]}" for n in range(num_llama_layers)} if match else {key}
    return keys


def test_meta_build_allocates_nothing(meta_models):
    for model in meta_models.values():
        tensors = [*model.parameters(), *model.buffers()]
        assert tensors and all(t.is_meta for t in tensors)
        assert model.llm_dtype == torch.bfloat16


@pytest.mark.parametrize("size", list(VICUNA))
def test_real_size_trained_keys_are_the_released_ones_with_their_shapes(meta_models, size):
    hidden, layers = llama_size(size)
    model = meta_models[size]
    shapes = {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}
    assert set(shapes) == released_keys(layers)
    assert all(to_original_name(n) in shapes for n, p in model.named_parameters() if p.requires_grad)
    lora = {k: s for k, s in shapes.items() if ".lora_" in k}
    assert len(lora) == layers * 2 * 2  # q_proj, v_proj x (A, B)
    assert {s for k, s in lora.items() if ".lora_A." in k} == {(8, hidden)}
    assert {s for k, s in lora.items() if ".lora_B." in k} == {(hidden, 8)}
    assert shapes["speech_llama_proj.weight"] == (hidden, 768) and shapes["speech_llama_proj.bias"] == (hidden,)
    for kind in ("key", "value"):  # cross-attention over Whisper (1280) + BEATs (768) channels
        assert shapes[f"speech_Qformer.bert.encoder.layer.0.crossattention.self.{kind}.weight"] == (768, 2048)
    assert shapes["ln_speech.weight"] == (1280,) and shapes["ln_audio.weight"] == (768,)
    assert shapes["speech_query_tokens"] == (1, 1, 768)


def test_real_size_parameter_counts(meta_models):
    """The LLaMA built from the config has the published size; the trained part besides LoRA and the projection
    (Q-Former, query, layer norms) does not depend on the LLM."""
    encoder_side = {}
    for size, model in meta_models.items():
        hidden, layers = llama_size(size)
        llama = model.llama_model.get_base_model()
        base = sum(p.numel() for n, p in llama.named_parameters() if ".lora_" not in n)
        assert base == LLAMA_PARAMETERS[size]
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora, projection = layers * 2 * 8 * 2 * hidden, hidden * 768 + hidden
        encoder_side[size] = trainable - lora - projection
    assert encoder_side["13b"] == encoder_side["7b"]


QWEN_PARAMETERS = {"qwen2.5-7b": 7_615_616_512, "qwen3-8b": 8_190_735_360}  # published: 7.61B and 8.19B


@pytest.mark.parametrize("name", list(QWEN))
def test_qwen_salmonn_builds_on_meta_with_the_published_llm_size(real_configs, tmp_path, name):
    """The same connector and LoRA on Qwen2.5-7B / Qwen3-8B: their config's architecture (Qwen2 with q/k/v biases,
    Qwen3 with q/k norms), their chat template, and the memory plan counting exactly what was built."""
    from tools import memory_plan as mp

    folders = {**real_configs, **write_config_folders(tmp_path, (name,))}
    model = build_on_meta(folders, name)
    llm = model.llama_model.get_base_model()
    assert type(llm).__name__ == {"qwen2.5-7b": "Qwen2ForCausalLM", "qwen3-8b": "Qwen3ForCausalLM"}[name]
    base = sum(p.numel() for n, p in llm.named_parameters() if ".lora_" not in n)
    assert base == QWEN_PARAMETERS[name] == mp.llm_parameters(mp.released_shape(name).llm)
    lora = sum(p.numel() for n, p in llm.named_parameters() if ".lora_" in n)
    assert lora == mp.lora_parameters(mp.released_shape(name).llm, mp.released_shape(name).lora)
    hidden = QWEN[name]["hidden_size"]
    assert model.speech_llama_proj.weight.shape == (hidden, 768)
    assert model.text.uses_chat_template and model.text.end_ids == [model.text.tokenizer.convert_tokens_to_ids(
        "<|im_end|>")]


def test_13b_checkpoint_into_the_7b_model_names_the_key_and_both_shapes(meta_models):
    state_13b = meta_models["13b"].trainable_state_dict()
    shapes_7b = {k: tuple(v.shape) for k, v in meta_models["7b"].trainable_state_dict().items()}
    with pytest.raises(CheckpointError, match="has shape") as error:
        load_trainable_state_dict(meta_models["7b"], state_13b, source="salmonn_v1.pth")
    found = re.search(r"salmonn_v1\.pth: '(\S+)' has shape \(([\d, ]+)\) in the checkpoint but \(([\d, ]+)\) in the "
                      r"model", str(error.value))
    assert found, str(error.value)
    key, shape_ckpt, shape_model = found[1], found[2], found[3]
    assert shape_ckpt == ", ".join(map(str, state_13b[key].shape))
    assert shape_model == ", ".join(map(str, shapes_7b[key])) and shape_ckpt != shape_model


# ------------------------------------------------------------------------------------------ loading without waste


@pytest.mark.parametrize("layout", ["WhisperModel", "WhisperForConditionalGeneration"])
def test_whisper_loads_its_encoder_only_in_dtype_with_the_weights_of_the_whole_model(tmp_path, layout):
    """The encoder-only load reads the same tensors as loading the whole Whisper and keeping its encoder, from
    either layout a Whisper folder comes in (whisper-large-v2's file is WhisperForConditionalGeneration's)."""
    import transformers

    folder = ROOT / "assets/tiny/whisper"
    if layout != "WhisperModel":
        getattr(transformers, layout).from_pretrained(folder).save_pretrained(tmp_path)
        (tmp_path / "preprocessor_config.json").write_bytes((folder / "preprocessor_config.json").read_bytes())
        folder = tmp_path
    whole = transformers.WhisperModel.from_pretrained(ROOT / "assets/tiny/whisper", dtype=torch.bfloat16).encoder
    encoder = SALMONN._load_whisper_encoder(folder, random_init=False, dtype=torch.bfloat16)
    assert not any("decoder" in n for n, _ in encoder.named_modules())
    expected = whole.state_dict()
    assert set(encoder.state_dict()) == set(expected)
    for name, tensor in encoder.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name]), name


def test_random_init_builds_in_torch_dtype():
    """No fp32 copy of the frozen weights is ever made (a 7B LLaMA built in fp32 first would need 27 GB)."""
    made: list[torch.dtype] = []
    original = torch.nn.Linear.reset_parameters

    def record(self):
        made.append(self.weight.dtype)
        original(self)

    cfg = dict(llama_path=str(ROOT / "assets/tiny/llama"), whisper_path=str(ROOT / "assets/tiny/whisper"),
               beats_path="", random_init=True, torch_dtype="bfloat16", lora=False)
    torch.nn.Linear.reset_parameters = record
    try:
        model = SALMONN(cfg)
    finally:
        torch.nn.Linear.reset_parameters = original
    frozen = [*model.llama_model.parameters(), *model.speech_encoder.parameters()]
    assert {p.dtype for p in frozen} == {torch.bfloat16}
    n_frozen_linears = sum(isinstance(m, torch.nn.Linear) for m in [*model.llama_model.modules(),
                                                                   *model.speech_encoder.modules()])
    assert made.count(torch.bfloat16) == n_frozen_linears  # each built in bf16, none in fp32 then cast


def test_the_real_size_benchmark_runs_end_to_end_on_the_tiny_model(tmp_path):
    """benchmarks.bench_real_size on the tiny default laid out under the real names: every phase measured,
    the JSON written, and a second run into the same folder refused."""
    from benchmarks import bench_real_size
    from tools.real_size import BEATS_FILE, RELEASED_CHECKPOINT, VICUNA_FOLDER, WHISPER_FOLDER

    assets = tmp_path / "assets"
    assets.mkdir()
    tiny = ROOT / "assets/tiny"
    for name, target in ((WHISPER_FOLDER, tiny / "whisper_5s"), (VICUNA_FOLDER["7b"], tiny / "llama"),
                         (f"{BEATS_FILE}.pt", tiny / "beats.pt"),
                         (RELEASED_CHECKPOINT["7b"], tiny / "salmonn_tiny.pth")):
        (assets / name).symlink_to(target)
    args = ["--assets", str(assets), "--cfg-path", str(ROOT / "configs/demo.yaml"), "--out", str(tmp_path / "out"),
            "--new-tokens", "3"]
    assert bench_real_size.main(args) == 0
    results = json.loads((tmp_path / "out/bench_real_size.json").read_text())
    steps = [k for k in results if k.startswith("train step")]
    assert len(steps) == 3 and all(results[k]["peak_rss_gib"] >= results[k]["rss_before_gib"] for k in steps)
    per_turn, packed = results[steps[0]], results[steps[1]]
    assert packed["llm_positions"] < per_turn["llm_positions"]  # trimmed, packed: fewer speech tokens
    assert results["generate 3 tokens"]["tpot_s"] >= 0
    assert bench_real_size.main(args) == 2

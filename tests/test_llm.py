"""The LLM seam (models/llm.py): any Hugging Face causal-LM folder, its chat template, its end-of-turn token, strict
loading, LoRA targets and FSDP's shard units, on the tiny LLaMA (Vicuna stand-in) and the tiny Qwen3."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from config import ConfigError, load_config, section_defaults
from dataset_v1 import build_dataset, make_batch
from models import SAMPLE_RATE, SPEECH_SLOT
from models.llm import ChatText, decoder_layer_classes
from models.salmonn import SALMONN

ROOT = Path(__file__).resolve().parents[1]
QWEN, LLAMA = ROOT / "assets/tiny/qwen", ROOT / "assets/tiny/llama"
DEMO_ANN = ROOT / "data/demo/ann"


def demo_model_cfg(config: str = "configs/demo_qwen.yaml", **overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / config).model)
    for key in ("llm_path", "whisper_path", "beats_path", "prompt_path", "test_prompt_path"):
        if cfg.get(key):
            cfg[key] = str(ROOT / cfg[key])
    return {**cfg, "ckpt": "", **overrides}


# ---------------------------------------------------------------------------------------------- the text side
def test_qwen_folder_uses_its_chat_template_and_ends_answers_with_im_end():
    text = ChatText(QWEN)
    im_end = text.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert text.uses_chat_template and not text.legacy
    assert text.bos_ids == []  # Qwen has no BOS; its template writes none
    assert text.end_ids == [im_end] and im_end in text.stop_ids
    ids, cut = text.target_ids("你好")
    assert not cut and ids[-1] == im_end and text.tokenizer.decode(ids[:-1]) == "你好"
    rendered = text.render([{"role": "user", "content": f"<Speech>{SPEECH_SLOT}</Speech> 说说。"}])
    assert rendered.startswith("<|im_start|>user\n")
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    prompt_ids, positions = text.prompt_ids(rendered)
    assert prompt_ids[0] == text.tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token, not its letters
    before, after = rendered.split(SPEECH_SLOT)
    assert positions == [len(text.encode(before))] and len(prompt_ids) == len(text.encode(before) + text.encode(after))


def test_thinking_is_off_by_default_and_a_key_turns_it_on():
    user = [{"role": "user", "content": "hi"}]
    thinking = ChatText(QWEN, enable_thinking=True)
    assert "<think>" not in thinking.render(user) and "<think>" in ChatText(QWEN).render(user)
    answer = thinking.encode("<think>\nweighing it</think>\n\n好的") + thinking.end_ids + thinking.encode("junk")
    assert thinking.answer(answer) == "好的"  # the thinking block and whatever follows the end token are dropped


def test_vicuna_folder_keeps_the_original_tokenisation():
    text = ChatText(LLAMA)
    assert text.legacy and not text.uses_chat_template
    rendered = text.render([{"role": "user", "content": f"<Speech>{SPEECH_SLOT}</Speech> Describe it."}])
    assert rendered == f"USER: <Speech>{SPEECH_SLOT}</Speech> Describe it.\nASSISTANT:"
    ids, positions = text.prompt_ids(rendered)
    head, tail = rendered.split(SPEECH_SLOT)
    assert ids == [text.tokenizer.bos_id] + text.tokenizer.encode(head) + text.tokenizer.encode(tail)
    assert positions == [1 + len(text.tokenizer.encode(head))]
    assert text.end_ids == [text.tokenizer.eos_id] == text.stop_ids
    assert ChatText(LLAMA, end_sym="</s>").end_ids == text.end_ids  # the original configs' end_sym


def test_a_chat_folder_can_still_be_asked_for_the_plain_template():
    text = ChatText(QWEN, chat_template="prompt_template")
    assert not text.uses_chat_template and text.render([{"role": "user", "content": "x"}]) == "USER: x\nASSISTANT:"
    assert text.end_ids == [text.tokenizer.eos_token_id]


def test_end_sym_must_be_one_token():
    with pytest.raises(ValueError, match=r"model.end_sym '</s>' is \d+ tokens"):
        ChatText(QWEN, end_sym="</s>")  # Vicuna's end symbol is plain text to Qwen's tokenizer
    assert ChatText(QWEN, end_sym="<|endoftext|>").end_ids == [ChatText(QWEN).pad_id]


# ---------------------------------------------------------------------------------------------- the config keys
def test_llm_path_and_its_original_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  llama_path: a\n  whisper_path: b\n")
    assert load_config(str(path)).model.llm_path == "a"
    path.write_text("model:\n  llama_path: a\n  llm_path: c\n  whisper_path: b\n")
    with pytest.raises(ConfigError, match="name different folders"):
        load_config(str(path))
    path.write_text("model:\n  whisper_path: b\n")
    with pytest.raises(ConfigError, match="model.llm_path"):
        load_config(str(path))
    assert load_config(str(ROOT / "configs/demo.yaml"), ["model.llm_path=x"]).model.llm_path == "x"
    assert section_defaults("model", {"llama_path": "a"})["llm_path"] == "a"


# ---------------------------------------------------------------------------------------------- the data side
def test_dialogue_turns_are_real_chat_turns_with_a_chat_template():
    cfg = demo_model_cfg()
    for text_inputs, assistant_turns in (("audio", 0), ("audio+transcript+replies", 2)):
        dataset = build_dataset(str(DEMO_ANN / "train.json"), {"text_inputs": text_inputs}, "valid", cfg)
        entry = next(i for i, e in enumerate(dataset.annotation) if len(e["turns"]) == 3)
        item = dataset[entry]
        prompt = item["prompt"]
        assert prompt.count("<|im_start|>user") == 3 and prompt.count("<|im_start|>assistant") == assistant_turns + 1
        assert prompt.count(SPEECH_SLOT) == 3 and len(item["slot_positions"]) == 3
        assert item["target_ids"][-1] == dataset.text.end_ids[0]
        assert dataset.annotation[entry]["text"] not in prompt  # the answer is never shown


def test_vicuna_dialogues_keep_the_turn_lines_of_the_trained_checkpoints():
    dataset = build_dataset(str(DEMO_ANN / "valid.json"), {}, "valid", demo_model_cfg("configs/demo.yaml"))
    prompt = dataset[0]["prompt"]
    assert prompt.startswith("USER: Turn 1: <Speech><SpeechHere></Speech>\nTurn 2:") and prompt.endswith("ASSISTANT:")


# ---------------------------------------------------------------------------------------------- the weights
def test_extra_tensor_in_the_llm_folder_is_refused_naming_it(tmp_path):
    folder = tmp_path / "qwen"
    shutil.copytree(QWEN, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(128)  # what a Qwen2 folder has and Qwen3 lacks
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected keys \(1\).*model\.layers\.0\.self_attn\.q_proj\.bias"):
        SALMONN.from_config(demo_model_cfg(llm_path=str(folder)))


def test_lora_targets_are_checked_against_the_llm():
    with pytest.raises(ValueError, match=r"\['query_key_value'\] name no linear layer.*q_proj"):
        SALMONN.from_config(demo_model_cfg(lora_target_modules=["q_proj", "query_key_value"]))


def test_decoder_layer_classes_come_from_the_model():
    for config, name in (("configs/demo.yaml", "LlamaDecoderLayer"), ("configs/demo_qwen.yaml", "Qwen3DecoderLayer")):
        model = SALMONN.from_config(demo_model_cfg(config))
        assert [c.__name__ for c in decoder_layer_classes(model.llama_model)] == [name]


def test_fsdp_shards_each_decoder_layer_of_llama_and_qwen(tmp_path):
    """One gloo rank: fully_shard turns each decoder layer into an FSDP unit, whatever the LLM's architecture."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from runner import fsdp_wrap

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for config in ("configs/demo.yaml", "configs/demo_qwen.yaml"):
            model = SALMONN.from_config(demo_model_cfg(config))
            layers = decoder_layer_classes(model.llama_model)
            fsdp_wrap(model, None)
            units = [m for m in model.modules() if isinstance(m, FSDPModule)]
            assert sum(isinstance(m, layers) for m in units) == model.llama_model.config.num_hidden_layers == 2
            assert units[0] is model  # and the root
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- end to end
def tone(path: Path, seconds: float, freq: float) -> str:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SAMPLE_RATE)
    return str(path)


def test_qwen_learns_a_constant_answer_that_ends_at_im_end_with_no_markup(tmp_path):
    """Trained on one constant answer, the Qwen SALMONN decodes exactly it: the target ended with <|im_end|>, and
    generation stopped there (no template text, no second turn in the answer)."""
    torch.manual_seed(0)
    model = SALMONN.from_config(demo_model_cfg(lora_dropout=0.0))
    text = model.text
    answer = "我明白了。"
    wavs = [tone(tmp_path / f"{i}.wav", 1.0 + 0.5 * i, 200 + 150 * i) for i in range(2)]
    batches = [make_batch([w], "这段话的情绪是什么？", model_fe(model), text, language="zh") for w in wavs]
    for batch in batches:
        batch["input_ids"], batch["labels"], batch["attention_mask"] = with_target(batch, text, answer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for step in range(40):
        loss = model(batches[step % 2])["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    for batch in batches:
        assert model.generate(batch, {"max_new_tokens": 12, "num_beams": 1, "do_sample": False}) == [answer]
        embeds, mask, _ = model._batch_sequences(batch, with_targets=False, left_pad=True)
        ids = model.llama_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12,
                                         generation_config=model.generation_config({"do_sample": False}))[0].tolist()
        assert ids == text.encode(answer) + text.end_ids  # stopped at <|im_end|>, nothing after it


def model_fe(model: SALMONN):
    from dataset_v1 import load_feature_extractor

    return load_feature_extractor(model.cfg["whisper_path"])


def with_target(batch: dict, text: ChatText, answer: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one-sample batch's token tensors with `answer` as its target."""
    from dataset_v1 import token_batch

    prompt_ids = batch["input_ids"][0, :int(batch["prompt_lengths"][0])].tolist()
    tokens = token_batch([{"prompt_ids": prompt_ids, "target_ids": text.target_ids(answer)[0],
                           "slot_positions": batch["slot_positions"][0]}])
    return tokens["input_ids"], tokens["labels"], tokens["attention_mask"]


def test_train_py_takes_any_llm_folder_from_the_command_line(tmp_path):
    """The README's switch: the demo config, another LLM folder, no checkpoint."""
    import train

    out = tmp_path / "run"
    code = train.main(["--cfg-path", str(ROOT / "configs/demo.yaml"), "--options", f"model.llm_path={QWEN}",
                       "model.ckpt=''", f"run.output_dir={out}", "run.epoch_based=false", "run.iters_per_epoch=2",
                       "run.optims.max_epoch=1", "run.valid_decode_samples=2", "run.num_workers=0",
                       f"datasets.train_ann_path={DEMO_ANN / 'train.json'}",
                       f"datasets.valid_ann_path={DEMO_ANN / 'valid.json'}", "model.prompt_path="
                       f"{ROOT / 'prompts/train_prompt.json'}",
                       f"model.test_prompt_path={ROOT / 'prompts/test_prompt.json'}",
                       f"model.whisper_path={ROOT / 'assets/tiny/whisper_5s'}",
                       f"model.beats_path={ROOT / 'assets/tiny/beats.pt'}"])
    assert code == 0
    saved = torch.load(out / "checkpoint_step2.pth", map_location="cpu", weights_only=True)
    assert saved["config"]["model"]["llm_path"] == str(QWEN)
    assert any(".q_proj.lora_A." in k for k in saved["model"])
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2

"""Training a connector in stages (docs/training.md "A SALMONN for a new LLM"): the stage configs, the hand-over of
the stage-1 connector to a stage with LoRA and on to the fine-tune, and stage 1's alignment check (ASR decoded
again with silenced audio)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_runner import corpus_options, load, make_corpus, run_train

import runner
import train
from config import load_config
from models.checkpoint import CheckpointKeyError, from_original_name
from models.salmonn import SALMONN

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = ["stage1_qwen2.5_7b", "stage2_qwen2.5_7b", "finetune_humdial_qwen2.5_7b", "stage1_vicuna13b",
                 "stage2_vicuna13b", "activation_tuning_qwen2.5_7b"]
STEPS = dict(iters_per_epoch=2, optims__max_epoch=1, optims__warmup_steps=0, optims__init_lr=1e-2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_stage_configs_check_their_keys_and_say_what_to_download(name, tmp_path, capsys):
    cfg = load_config(str(ROOT / f"configs/{name}.yaml"), required_sections=("model", "datasets"))
    assert cfg.model.lora == (not name.startswith("stage1"))  # stage 1 trains the connector alone
    assert bool(cfg.model.ckpt) == (not name.startswith("stage1"))  # later stages start from the one before
    assert train.cli(["--cfg-path", str(ROOT / f"configs/{name}.yaml"), "--options",
                      f"run.output_dir={tmp_path / 'run'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and "Download" in error[0]


def connector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if ".lora_" not in k}


def test_stage1_connector_goes_to_stage2_with_fresh_lora_and_on_to_the_finetune(corpus, tmp_path):
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert run_train(corpus_options(corpus, stage1, **STEPS) + ["model.lora=false", "model.ckpt=''"]) == 0
    first = load(stage1 / "checkpoint_step2.pth")
    assert first["config"]["model"]["lora"] is False and not any(".lora_" in k for k in first["model"])

    # stage 2 builds from it: the connector as trained, the LoRA as peft initialises it (B zero: no change yet)
    cfg = {**first["config"]["model"], "lora": True, "ckpt": str(stage1 / "checkpoint_step2.pth"),
           **{k: str(ROOT / v) for k, v in first["config"]["model"].items() if k.endswith("_path") and v}}
    model = SALMONN.from_config(cfg)
    params = dict(model.named_parameters())
    for key, value in first["model"].items():
        assert torch.equal(params[from_original_name(key)], value), key
    lora_b = [p for n, p in params.items() if ".lora_B." in n]
    assert lora_b and all(not p.any() for p in lora_b)

    assert run_train(corpus_options(corpus, stage2, **STEPS) + [f"model.ckpt={stage1 / 'checkpoint_step2.pth'}"]) == 0
    second = load(stage2 / "checkpoint_step2.pth")
    assert any(".lora_B." in k and v.any() for k, v in second["model"].items())  # the LoRA trained in stage 2
    assert set(connector(second["model"])) == set(first["model"])

    finetune = SALMONN.from_config({**cfg, "ckpt": str(stage2 / "checkpoint_step2.pth")})  # strict: all of it
    assert all(torch.equal(v, second["model"][k]) for k, v in finetune.trainable_state_dict().items())


def test_a_checkpoint_without_lora_and_without_a_stored_config_is_still_refused(corpus, tmp_path):
    """Only a checkpoint that says it was trained without LoRA may leave the LoRA at its init."""
    stage1 = tmp_path / "stage1"
    assert run_train(corpus_options(corpus, stage1, **STEPS) + ["model.lora=false", "model.ckpt=''"]) == 0
    bare = tmp_path / "bare.pth"
    torch.save({"model": load(stage1 / "checkpoint_step2.pth")["model"]}, bare)
    with pytest.raises(CheckpointKeyError, match="trained tensors are missing.*lora"):
        run_train(corpus_options(corpus, tmp_path / "stage2", **STEPS) + [f"model.ckpt={bare}"])


def test_alignment_check_decodes_the_asr_samples_again_with_silenced_audio(corpus, tmp_path, monkeypatch):
    decoded: dict[str, list[bool]] = {}
    plain_decode = runner.Runner.decode

    def spy(self, split, limit=0):
        dataset = self.datasets[split]
        decoded[split] = [all(not np.any(clip) for clip in dataset[i]["clips"])
                          for i in range(min(limit, len(dataset)))]
        return plain_decode(self, split, limit)

    monkeypatch.setattr(runner.Runner, "decode", spy)
    out = tmp_path / "run"
    assert run_train(corpus_options(corpus, out, valid_decode_samples=2, **STEPS) + ["model.lora=false",
                                                                                      "model.ckpt=''"]) == 0
    assert decoded == {"valid": [False, False], "valid_silenced": [True, True]}  # same samples, audio zeroed
    valid = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "valid"][-1]
    assert {"asr/en/wer", "silenced/asr/en/wer"} <= set(valid)
    log = (out / "train.log").read_text()
    assert f"alignment check at step 2: asr/en/wer {valid['asr/en/wer']:.1f} with audio, " \
           f"{valid['silenced/asr/en/wer']:.1f} silenced" in log

    decoded.clear()
    out_off = tmp_path / "off"
    assert run_train(corpus_options(corpus, out_off, valid_decode_samples=2, alignment_check=False, **STEPS)) == 0
    assert list(decoded) == ["valid"]


@pytest.mark.parametrize("llm", ["llama", "qwen"])
def test_text_warm_up_writes_an_llm_folder_that_loads_strictly_and_learned(llm, tmp_path):
    """The alignment experiment's stand-in for a pretrained LLM: trained on text pairs, saved in the source's
    format, loaded back by the strict loader, and fitting its pairs better than the random source did."""
    from scripts.alignment_experiment import LLMS, warm_up_llm
    from models.llm import ChatText, load_llm

    pairs = [([{"role": "user", "content": "<Speech></Speech> Recognize the speech."}], answer)
             for answer in ("the cat sat down", "open the door", "你好，今天怎么样？")]
    folder = warm_up_llm(LLMS[llm], tmp_path / "llm", pairs, steps=30)
    cfg = {"random_init": False, "lora": False}
    text = ChatText(folder)

    def answer_loss(model: torch.nn.Module) -> float:
        total = 0.0
        for messages, answer in pairs:
            prompt, _ = text.prompt_ids(text.render(messages))
            target = text.target_ids(answer)[0]
            ids = torch.tensor([prompt + target])
            labels = torch.tensor([[-100] * len(prompt) + target])
            total += float(model(input_ids=ids, labels=labels).loss)
        return total

    with torch.no_grad():
        before = answer_loss(load_llm(LLMS[llm], cfg, torch.float32))
        after = answer_loss(load_llm(folder, cfg, torch.float32))  # strict: no missing or unexpected tensor
    assert after < 0.5 * before
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in LLMS[llm].iterdir())


def test_activation_tuning_samples_train_the_tiny_model_with_the_recipes_run_settings(tmp_path):
    """The few-shot activation-tuning recipe: its handful of long answers in both languages is read whole (no
    sample refused or cut at max_txt_len) and moves the LoRA in the recipe's steps and learning rate."""
    recipe = load_config(str(ROOT / "configs/activation_tuning_qwen2.5_7b.yaml"), required_sections=("model",))
    samples = json.loads((ROOT / recipe.datasets.train_ann_path).read_text(encoding="utf-8"))["annotation"]
    assert {e["language"] for e in samples} == {"en", "zh"} and all(e["Q"] and e["task"] == "QA" for e in samples)
    assert all(len(e["text"]) >= (100 if e["language"] == "zh" else 250) for e in samples)  # long, open answers
    out = tmp_path / "run"
    steps, batch = recipe.run.iters_per_epoch, recipe.run.batch_size_train
    assert train.main(["--cfg-path", str(ROOT / "configs/demo_qwen.yaml"), "--options",
                       f"datasets.train_ann_path={ROOT / recipe.datasets.train_ann_path}", "datasets.valid_ann_path=''",
                       "datasets.test_ann_path=''", f"model.max_txt_len={recipe.model.max_txt_len}",
                       f"run.output_dir={out}", "run.epoch_based=false", f"run.iters_per_epoch={steps}",
                       f"run.batch_size_train={batch}", "run.num_workers=0", "run.optims.max_epoch=1",
                       *(f"run.optims.{k}={recipe.run.optims[k]}" for k in ("warmup_steps", "init_lr", "min_lr"))]) == 0
    trained = load(out / f"checkpoint_step{steps}.pth")["model"]
    assert steps * batch >= 2 * len(samples)  # every sample seen at least twice
    assert any(".lora_B." in k and v.any() for k, v in trained.items())  # peft starts B at zero


def test_text_warm_up_pairs_hold_back_the_test_sentences_and_answer_plainly(tmp_path):
    """The warm-up's text pairs are drawn from the training sentences only (the text ceiling is then measured on
    sentences it never saw), cover the three tasks, and answer each trajectory in its plain form."""
    from scripts.alignment_experiment import emotion_sentences, text_pairs
    from tools.demo_answers import trajectory_summary

    split = {language: emotion_sentences(language) for language in ("en", "zh")}
    held_out = {s for parts in split.values() for s, _ in parts["held_out"]}
    emotion_of = {s: e for parts in split.values() for s, e in parts["train"]}
    language_of = {s: language for language, parts in split.items() for s, _ in parts["train"]}
    assert held_out and not held_out & set(emotion_of)
    asr = tmp_path / "asr.json"
    asr.write_text(json.dumps({"annotation": [{"text": s, "language": "en"} for s in list(emotion_of)[:5]]}))
    pairs = text_pairs(asr, chat_template=False, count=300)
    assert len(pairs) == 300
    tasks = {"asr": 0, "emotion_recognition": 0, "emotional_trajectory": 0}
    for messages, answer in pairs:
        said = [part.split("</Speech>")[0] for m in messages for part in m["content"].split("<Speech>")[1:]]
        assert not held_out & set(said)
        if len(said) == 1 and answer == said[0]:
            tasks["asr"] += 1
        elif len(said) == 1:
            tasks["emotion_recognition"] += 1
        else:
            tasks["emotional_trajectory"] += 1
            emotions = [emotion_of.get(s, "neutral") for s in said]  # the closing question is neutral
            assert answer == trajectory_summary(emotions, language_of[said[0]])
    assert all(count >= 30 for count in tasks.values()), tasks

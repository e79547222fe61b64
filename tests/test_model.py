"""The SALMONN model on the tiny embedded default (assets/tiny: saved random weights, CPU)."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from helpers import prompt_tokens
from models.checkpoint import load_checkpoint
from models.salmonn import SALMONN
from models.tokenizer import SalmonnTokenizer

PROMPT = "USER: <Speech><SpeechHere></Speech> Describe the emotion.\nASSISTANT:"
TRAINED = re.compile(r"^(speech_Qformer\.bert\.|speech_query_tokens$|speech_llama_proj\.|ln_speech\.|ln_audio\.|"
                     r"llama_model\.base_model\.model\.model\.layers\.\d+\.self_attn\.[qv]_proj\.lora_[AB]\.default\.weight$)")


def tiny_cfg(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load("configs/demo.yaml").model)
    # the demo's model with a 30 s Whisper window, q/v LoRA and untrimmed tokens, as the released checkpoints
    cfg.update(prompt_path="", ckpt="", lora_dropout=0.0, whisper_path="assets/tiny/whisper", lora_rank=8,
               lora_target_modules=["q_proj", "v_proj"], trim_speech_padding=False, cache_frozen_encoders=False)
    cfg.update(overrides)
    return cfg


def build(seed: int = 0, **overrides) -> SALMONN:
    torch.manual_seed(seed)
    return SALMONN.from_config(tiny_cfg(**overrides))


def randomize_trainable(model: SALMONN, seed: int) -> None:
    """LoRA B starts at zero; give every trained tensor values so that a wrong load would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def clips(*seconds: float, seed: int = 0) -> dict:
    """A batch of tone+noise clips of the given lengths, one clip per sample."""
    from dataset_v1 import load_feature_extractor

    fe = load_feature_extractor("assets/tiny/whisper")
    rng = np.random.default_rng(seed)
    waves = [(0.1 * np.sin(2 * np.pi * 300 * np.arange(int(s * 16000)) / 16000)
              + 0.02 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in seconds]
    n = max(len(w) for w in waves)
    raw = torch.zeros(len(waves), n)
    pad = torch.ones(len(waves), n, dtype=torch.bool)
    for i, w in enumerate(waves):
        raw[i, : len(w)] = torch.from_numpy(w)
        pad[i, : len(w)] = False
    spec = torch.from_numpy(fe(waves, sampling_rate=16000, return_tensors="np").input_features)
    return {"spectrogram": spec, "raw_wav": raw, "padding_mask": pad}


def rows(batch: dict, idx: list[int]) -> dict:
    """Sub-batch with the padding trimmed to the longest selected clip (as a collater would make it)."""
    n = int((~batch["padding_mask"][idx]).sum(-1).max())
    return {"spectrogram": batch["spectrogram"][idx], "raw_wav": batch["raw_wav"][idx, :n],
            "padding_mask": batch["padding_mask"][idx, :n]}


@pytest.fixture(scope="module")
def model() -> SALMONN:
    m = build()
    randomize_trainable(m, 1)
    return m.eval()


def test_window_kernel_and_counts_follow_frame_rate(model):
    # 50 Whisper frames/s: 0.333333 s -> 17 frames; 1500 frames -> (1500 - 17) // 17 + 1 = 88 windows
    assert model.window_size(1500, 30.0) == (17, 17)
    for seconds in (1.0, 7.3, 30.0):
        expected = min(math.ceil(math.ceil(seconds * 50) / 17), (1500 - 17) // 17 + 1)
        got = SALMONN.num_windows(torch.tensor([int(seconds * 16000)]), 50.0, 17, 88)
        assert int(got) == expected, seconds
    assert [min(math.ceil(math.ceil(s * 50) / 17), 88) for s in (1.0, 7.3, 30.0)] == [3, 22, 88]


def test_encode_speech_shapes_and_trimming():
    batch = clips(1.0, 7.3, 30.0)
    full = build(trim_speech_padding=False).eval()
    with torch.no_grad():
        embeds, atts = full.encode_speech(**_enc(batch))
    assert embeds.shape == (3, 88, 128) and bool((atts == 1).all())
    trimmed = build(trim_speech_padding=True).eval()
    with torch.no_grad():
        embeds_t, atts_t = trimmed.encode_speech(**_enc(batch))
    assert atts_t.sum(-1).tolist() == [3, 22, 88]
    kept = atts_t.bool()
    torch.testing.assert_close(embeds_t[kept], embeds[kept])  # trimming drops tokens, it never changes the rest


def _enc(batch: dict) -> dict:
    return {"spectrogram": batch["spectrogram"], "raw_wav": batch["raw_wav"],
            "audio_padding_mask": batch["padding_mask"]}


def test_training_step_updates_only_qformer_projection_norms_and_lora():
    m = build()
    m.train()
    batch = {**clips(2.0, 3.5), **prompt_tokens(m.text, [PROMPT, PROMPT], ["happy then sad", "angry"])}
    out = m(batch)
    assert torch.isfinite(out["loss"]) and int(out["num_tokens"]) > 0
    out["loss"].backward()
    from models.checkpoint import to_original_name

    with_grad = {to_original_name(n) for n, p in m.named_parameters() if p.grad is not None}
    trainable = {to_original_name(n) for n, p in m.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all(TRAINED.match(n) for n in trainable), sorted(n for n in trainable if not TRAINED.match(n))
    assert any(".lora_A." in n for n in trainable) and any(n.startswith("ln_audio") for n in trainable)
    assert not any(p.requires_grad for p in m.speech_encoder.parameters())
    assert not any(p.requires_grad for p in m.beats.parameters())


def test_generate_returns_clean_text(model):
    batch = clips(1.5, 2.5)
    texts = model.generate({**batch, **prompt_tokens(model.text, [PROMPT] * 2)},
                           {"max_new_tokens": 8, "num_beams": 1, "do_sample": False})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert not any(tok in t for t in texts for tok in ("<s>", "</s>", "<unk>"))


def test_batch_invariance_encode_and_generate(model):
    batch = clips(1.2, 6.0, 3.3)
    gen = {"max_new_tokens": 6, "num_beams": 1, "do_sample": False}
    with torch.no_grad():
        batched, _ = model.encode_speech(**_enc(batch))
        for i in range(3):
            alone, _ = model.encode_speech(**_enc(rows(batch, [i])))
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)
    prompts = [PROMPT, "USER: <Speech><SpeechHere></Speech> A much longer question about the audio?\nASSISTANT:",
               PROMPT]
    together = model.generate({**batch, **prompt_tokens(model.text, prompts)}, gen)
    alone = [model.generate({**rows(batch, [i]), **prompt_tokens(model.text, [prompts[i]])}, gen)[0] for i in range(3)]
    assert together == alone


def test_checkpoint_round_trip_in_original_key_format(tmp_path, model):
    state = model.trainable_state_dict()
    assert all(TRAINED.match(k) for k in state), [k for k in state if not TRAINED.match(k)]
    assert set(state) == {k for k in state if not k.startswith(("speech_encoder.", "beats."))}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state, "epoch": 0}, path)

    other = build(seed=0)  # same frozen base weights (the tiny saved ones stand in for the released files)
    randomize_trainable(other, 99)
    load_checkpoint(other, path)
    other.eval()
    batch = {**clips(2.0), **prompt_tokens(model.text, [PROMPT], ["calm"])}
    with torch.no_grad():
        a, b = model(batch), other(batch)
    assert torch.equal(a["logits"], b["logits"])
    # frozen weights come from the base models, not the checkpoint: only trained tensors were written
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(state) == n_trainable


def test_wrong_checkpoints_fail_with_the_key_and_shapes(tmp_path, model):
    state = model.trainable_state_dict()
    missing = dict(state)
    key = "speech_llama_proj.weight"
    del missing[key]
    torch.save({"model": missing}, tmp_path / "missing.pth")
    with pytest.raises(KeyError, match=re.escape(key)):
        load_checkpoint(build(), tmp_path / "missing.pth")

    wrong = dict(state)
    wrong[key] = torch.zeros(4096, 64)
    torch.save({"model": wrong}, tmp_path / "shape.pth")
    with pytest.raises(ValueError, match=r"speech_llama_proj\.weight.*\(4096, 64\).*\(128, 64\)"):
        load_checkpoint(build(), tmp_path / "shape.pth")

    extra = dict(state)
    extra["speech_Qformer.bert.encoder.layer.9.crossattention.self.query.weight"] = torch.zeros(1)
    torch.save({"model": extra}, tmp_path / "extra.pth")
    with pytest.raises(KeyError, match="layer.9"):
        load_checkpoint(build(), tmp_path / "extra.pth")

    with pytest.raises(FileNotFoundError, match="salmonn_v1.pth"):
        load_checkpoint(build(), tmp_path / "absent.pth")


def test_real_paths_without_weights_say_what_to_download(tmp_path):
    import shutil

    configs_only = {"whisper": ("config.json", "preprocessor_config.json"), "llama": ("config.json", "tokenizer.model")}
    for folder, files in configs_only.items():
        (tmp_path / folder).mkdir()
        for name in files:
            shutil.copy(f"assets/tiny/{folder}/{name}", tmp_path / folder)
    with pytest.raises(FileNotFoundError, match="(?i)no weights in .*whisper.*download"):
        SALMONN.from_config(tiny_cfg(whisper_path=str(tmp_path / "whisper")))
    with pytest.raises(FileNotFoundError, match="(?i)no weights in model.llm_path .*llama.*download"):
        SALMONN.from_config(tiny_cfg(llm_path=str(tmp_path / "llama")))
    with pytest.raises(FileNotFoundError, match="(?i)download the LLM.*nowhere"):
        SALMONN.from_config(tiny_cfg(llm_path=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match="(?i)BEATs.*download"):
        SALMONN.from_config(tiny_cfg(beats_path=str(tmp_path / "BEATs.pt")))
    (tmp_path / "beats.json").write_text('{"encoder_layers": 2}')
    with pytest.raises(ValueError, match="config only; set model.random_init: true"):
        SALMONN.from_config(tiny_cfg(beats_path=str(tmp_path / "beats.json")))
    with pytest.raises(FileNotFoundError, match="(?i)download.*whisper"):
        SALMONN.from_config(tiny_cfg(whisper_path=str(tmp_path / "nowhere")))


def test_several_speech_slots_and_long_turns(model):
    """A two-turn prompt: turn 1 has two clips (a >30 s turn), turn 2 one clip."""
    batch = clips(2.0, 1.5, 3.0)
    two_turns = "USER: Turn 1: <Speech><SpeechHere></Speech>\nTurn 2: <Speech><SpeechHere></Speech> Q?\nASSISTANT:"
    samples = {**batch, "speech_slots": [[[0, 1], [2]]], **prompt_tokens(model.text, [two_turns], ["ok"])}
    with torch.no_grad():
        embeds, mask, labels = model._batch_sequences(samples, with_targets=True, left_pad=False)
    tok = model.text.tokenizer
    text_tokens = sum(len(tok.encode(p)) for p in two_turns.split("<SpeechHere>")) + 1  # + bos
    target = len(tok.encode("ok</s>"))
    assert embeds.shape[1] == text_tokens + 3 * 88 + target
    assert int((labels != -100).sum()) == target
    # the speech tokens sit exactly at the slot positions: nothing of the text moved or lost
    positions = samples["slot_positions"][0]
    text_embeds = model.llama_model.get_input_embeddings()(samples["input_ids"][0])
    torch.testing.assert_close(embeds[0, :positions[0]], text_embeds[:positions[0]])
    after_first = positions[0] + 2 * 88
    torch.testing.assert_close(embeds[0, after_first:after_first + positions[1] - positions[0]],
                               text_embeds[positions[0]:positions[1]])
    bad = {**samples, "speech_slots": [[[0], [1], [2]]]}
    with pytest.raises(ValueError, match="2 slot positions but 3 speech slots"):
        model._batch_sequences(bad, with_targets=True, left_pad=False)


def test_long_target_is_cut_and_keeps_its_end_token():
    m = build(max_txt_len=5)
    ids, cut = m.text.target_ids("one two three four five six seven eight nine ten")
    assert cut and len(ids) == 5 and ids[-1] == m.text.eos_id
    assert m.text.target_ids("one") == (m.text.encode("one") + [m.text.eos_id], False)


def test_lora_scaling_zero_is_the_base_model(model):
    batch = {**clips(2.0), **prompt_tokens(model.text, [PROMPT], ["calm"])}
    with torch.no_grad():
        scaled = model(batch)["logits"]
        model.set_lora_scaling(0.0)
        base_only = model(batch)["logits"]
        with model.llama_model.disable_adapter():
            base = model(batch)["logits"]
        model.set_lora_scaling(model.cfg["lora_alpha"] / model.cfg["lora_rank"])
        again = model(batch)["logits"]
    torch.testing.assert_close(base_only, base)
    assert not torch.allclose(scaled, base)
    torch.testing.assert_close(again, scaled)


def test_tokenizer_matches_sentencepiece_piece_by_piece():
    import sentencepiece as spm

    path = "assets/tiny/llama/tokenizer.model"
    tok, sp = SalmonnTokenizer(path), spm.SentencePieceProcessor(model_file=path)
    text = "</Speech> How did my emotion change?\nASSISTANT: You were happy, then sad.</s>"
    assert tok.encode(text) == sp.encode("</Speech> How did my emotion change?\nASSISTANT: You were happy, then sad."
                                         ) + [2]
    first = tok.encode("</Speech> x")[0]
    assert first == sp.piece_to_id("▁<") or sp.id_to_piece(first).startswith("▁")
    assert tok.decode(tok.encode("你好 world</s>")) == "你好 world"


def test_base_model_folder_missing_a_weight_is_an_error(tmp_path):
    """from_pretrained would random-init a missing tensor with only a log line; we refuse."""
    import shutil

    from safetensors.torch import load_file, save_file

    whisper = tmp_path / "whisper"
    shutil.copytree("tests/parity/whisper_dir", whisper)
    weights = load_file(str(whisper / "model.safetensors"))
    dropped = next(k for k in weights if "encoder.layers.1.fc1.weight" in k)
    del weights[dropped]
    save_file(weights, str(whisper / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys.*layers.1.fc1.weight"):
        SALMONN._load_whisper_encoder(whisper, random_init=False, dtype=torch.float32)


def test_cached_frozen_encoders_give_the_uncached_features_and_skip_seen_clips():
    plain = build().eval()
    cached = build(cache_frozen_encoders=True).eval()
    randomize_trainable(plain, 1)
    randomize_trainable(cached, 1)
    batch = clips(1.2, 6.0, 3.3)
    runs = {"whisper": 0, "beats": 0}
    cached.speech_encoder.register_forward_hook(lambda *_: runs.__setitem__("whisper", runs["whisper"] + 1))
    cached.beats.register_forward_hook(lambda *_: runs.__setitem__("beats", runs["beats"] + 1))
    with torch.no_grad():
        expected, atts = plain.encode_speech(**_enc(batch))
        first, first_atts = cached.encode_speech(**_enc(batch))
        assert len(cached.encoder_cache) == 3 and runs == {"whisper": 3, "beats": 3}  # each new clip alone
        # the same clips again, in another order and batched with a new one: only the new clip is encoded
        again = clips(1.2, 6.0, 3.3, 2.0)
        order = [3, 2, 0, 1]
        mixed, mixed_atts = cached.encode_speech(**_enc(rows(again, order)))
    torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(first_atts, atts)
    assert runs == {"whisper": 4, "beats": 4} and len(cached.encoder_cache) == 4
    torch.testing.assert_close(mixed[1:], expected[[2, 0, 1]], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        alone, _ = plain.encode_speech(**_enc(rows(again, [3])))
    torch.testing.assert_close(mixed[:1], alone, atol=1e-5, rtol=1e-5)


def test_encoder_cache_refuses_a_trained_encoder():
    with pytest.raises(ValueError, match="cache_frozen_encoders.*freeze_whisper"):
        build(cache_frozen_encoders=True, freeze_whisper=False)

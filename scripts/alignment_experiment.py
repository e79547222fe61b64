"""Does staged training align a connector to a new LLM? The tiny LLaMA and the tiny Qwen3, each through stage 1
(connector only, ASR) and then the HumDial-shaped emotional-trajectory fine-tune, against the same fine-tune from
an unaligned connector and with the audio silenced (docs/alignment_experiment.md; docs/training.md).

    python -m scripts.alignment_experiment                  # both LLMs; prints and saves the tables and the plot
    python -m scripts.alignment_experiment --llms qwen --stage1-steps 400 --finetune-steps 300   # quicker

Steps (each one a plain command of this repo, printed as it runs; the two LLMs run side by side):
1. Corpora, made here with espeak-ng. Every sentence names how the speaker feels: one of six frames ("I feel {}
   today.", "这个消息让我很{}。") with one of three answer words per emotion (tools.demo_answers); one frame-word
   pair in about twelve is held out (only in test dialogues). Each clip is spoken in the prosody of the emotion it
   names (make_demo_corpus's pitch, range, rate and volume per emotion), as words and voice agree in emotional
   speech: to get the emotion word right, stage 1's ASR must hear the voice. Stage 1's ASR clips: the training
   sentences in five voices per language, 24 per language in the held-out sixth voice for validation. The
   fine-tune's HumDial Task 1 corpus: 400 dialogues (2-4 such statements, each labelled with the emotion it names,
   then the neutral closing question; `convert.py` writes the annotations), the 80 test dialogues in the held-out
   voice, each with a held-out sentence. Answers in their plain form.
2. Text warm-up of each tiny LLM: the tiny LLMs were never pretrained, so each first learns its tasks from text,
   the transcript written where the speech will go (ASR: copy it; emotion recognition: the emotion it names; the
   trajectory: the emotions of the turns' transcripts, in order), as a pretrained LLM would answer from a
   transcript; every pair drawn afresh from the training sentences. Written to <out>/llm_<name>/; the same LLM
   serves every start below. Its "text ceiling" (the test dialogues as text) is what a perfectly aligned
   connector could hand the fine-tune.
3. Stage 1: `train.py` on the ASR clips with `model.lora: false` (the Q-Former and projection learn, the LLM is
   frozen), validating every `--stage1-steps / 8` steps on the held-out voice with the alignment check (each
   clip decoded with its audio and silenced): WER (en) and CER (zh) over the steps.
   The stage-1 model as it is (no fine-tune) is decoded on the test dialogues too: what alignment alone gives.
4. The fine-tune, three ways with the same data, steps, seed and learning rate: from the stage-1 connector
   (`model.ckpt`: its LoRA starts fresh), from a fresh connector, and from the stage-1 connector with every clip
   silenced. Every `--finetune-steps / 6` steps it logs the teacher-forced loss and token accuracy of the test
   dialogues' answers (a continuous measure; nothing is selected by it). `evaluate.py` decodes the test dialogues
   with the last step's weights: per-turn trajectory accuracy, exact sequence, and language match (and Chinese
   dialogues answered in Chinese).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from humdial.trajectory import emotion_trajectory_scores
from metrics import EMOTIONS, language_match
from models.llm import IGNORE_INDEX, ChatText
from prompting import SPEECH_SLOT, TurnText, choose_prompt, conversation, load_prompts, prompt_key
from scripts.learning_experiment import (check_held_out, dialogues, read_predictions, run, run_in_rounds,
                                         run_together, score, sub_dialogues, turn_samples, write_annotation)
from scripts.make_demo_corpus import PLAIN_AUDIO_FORMAT, QUESTIONS, REPLIES, make_speakers, synthesize, turn_voice
from tools.demo_answers import ANSWER_WORDS, LABEL_WORDS, trajectory_summary

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_learning.yaml"  # the tiny connector and LoRA of the listening experiment
LLMS = {"llama": ROOT / "assets/tiny/llama", "qwen": ROOT / "assets/tiny/qwen"}
VOICE_SEED = 0  # make_speakers' six voices per language, the same in both corpora
HELD_OUT_VOICE = 5  # of make_speakers' six per language: its clips are stage 1's validation set
DECODE = ["generate.num_beams=1", "generate.max_new_tokens=48"]
STAGE1_DECODE = ["generate.num_beams=1", "generate.max_new_tokens=24"]  # the sentences are 9-17 tokens
STAGE1_VALID_PER_LANGUAGE = 24  # clips of the held-out voice decoded (with audio and silenced) per validation
STAGE1_VALIDATIONS = 8
FINETUNE_VALIDATIONS = 6
WARMUP_BATCH = 32  # text pairs per warm-up step
WARMUP_LR = 3e-3


# ---------------------------------------------------------------------------------------------- corpora
# The sentences of both corpora say how the speaker feels: a frame with one emotion word in it (the answer words
# of tools.demo_answers), spoken in that emotion's prosody. The tiny random-init encoders cannot tell 21 words
# apart by their sounds within the steps here (with the prosody drawn independently of the words, stage 1 learned
# the frames and named the emotion at chance, docs/alignment_experiment.md), but they hear the voice: ASR then
# teaches the connector to carry the emotion as the word an LLM reads, what the fine-tune needs.
FRAMES = {
    "en": ["I feel {} today.", "This news makes me {}.", "Honestly, I am {} right now.",
           "My friends say I look {}.", "I was so {} after the call.", "The whole trip left me {}."],
    "zh": ["我今天很{}。", "这个消息让我很{}。", "说实话，我现在很{}。", "朋友们说我看起来很{}。",
           "打完电话我非常{}。", "这次旅行让我觉得很{}。"],
}
WORDS_PER_EMOTION = 3  # the first three answer words of each emotion
HELD_OUT_SHARE = 6  # one (frame, word) pair in six is never trained on: only in test dialogues


def emotion_sentences(language: str) -> dict[str, list[tuple[str, str]]]:
    """{"train": [(sentence, emotion)], "held_out": [...]}: every frame with every word; the held-out pairs are
    drawn so that each word and each frame is still trained on in other pairs."""
    rng = random.Random(f"sentences:{language}")
    split: dict[str, list[tuple[str, str]]] = {"train": [], "held_out": []}
    for emotion in EMOTIONS:
        for w, word in enumerate(ANSWER_WORDS[language][emotion][:WORDS_PER_EMOTION]):
            held = rng.randrange(len(FRAMES[language]))  # one frame of each word is held out, at random
            for f, frame in enumerate(FRAMES[language]):
                part = "held_out" if f == held and rng.random() < WORDS_PER_EMOTION / HELD_OUT_SHARE else "train"
                split[part].append((frame.format(word), emotion))
    return split


def asr_corpus(out: Path, seed: int, valid_per_language: int) -> tuple[Path, Path]:
    """Stage 1's clips: every training sentence (en, zh) in the five training voices, each with a random emotion's
    prosody; (train.json, valid.json) in the original annotation format. Validation: `valid_per_language`
    training sentences per language in the held-out sixth voice."""
    if (out / "valid.json").is_file():
        return out / "train.json", out / "valid.json"
    rng = random.Random(seed)
    speakers = make_speakers(random.Random(VOICE_SEED))
    jobs, entries = [], {"train": [], "valid": []}
    for language in ("en", "zh"):
        sentences = emotion_sentences(language)["train"]
        valid = set(rng.sample(range(len(sentences)), valid_per_language))
        for s, (sentence, emotion) in enumerate(sentences):
            for v, speaker in enumerate(speakers[language]):
                if v == HELD_OUT_VOICE and s not in valid:
                    continue
                voice = turn_voice(speaker, emotion, language, rng)
                name = f"{language}_{s:03d}_v{v}.wav"
                jobs.append((out / "audio" / name, sentence, voice))
                split = "valid" if v == HELD_OUT_VOICE else "train"
                entries[split].append({"id": name[:-4], "path": f"audio/{name}", "text": sentence, "task": "asr",
                                       "language": language})
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: synthesize(job[0], job[1], job[2], PLAIN_AUDIO_FORMAT), jobs))
    for split, items in entries.items():
        write_annotation(out / f"{split}.json", items)
    return out / "train.json", out / "valid.json"


def build_dialogues(out: Path, num_dialogues: int, num_test: int, seed: int) -> None:
    """HumDial Task 1 dialogues in the release's JSONL (then `convert.py`, as scripts/make_demo_corpus.py does):
    2-4 statements, each one of the sentences above and labelled with the emotion it names, then the closing
    question (neutral); the answer is the trajectory in its plain form (tools.demo_answers.trajectory_summary
    without rng: one word per emotion), so that the answer's only uncertain words are the emotions.
    Training dialogues: training sentences, the five training voices; test dialogues: the held-out voice, each with
    at least one held-out sentence."""
    rng = random.Random(seed)
    speakers = make_speakers(random.Random(VOICE_SEED))  # the same six voices per language as stage 1's
    lines: dict[str, list[str]] = {"train": [], "test": []}
    jobs = []
    for index in range(num_dialogues):
        split = "test" if index >= num_dialogues - num_test else "train"
        language = ("en", "zh")[index % 2]
        sentences = emotion_sentences(language)
        speaker_index = HELD_OUT_VOICE if split == "test" else rng.randrange(HELD_OUT_VOICE)
        dialogue_id = f"{language}_{speaker_index + 1:04d}_{index + 1:04d}"
        statements = rng.sample(sentences["train"], rng.choice([2, 3, 4]))
        if split == "test":
            statements[rng.randrange(len(statements))] = rng.choice(sentences["held_out"])
        turns = statements + [(rng.choice(QUESTIONS[language]), "neutral")]
        answer = trajectory_summary([emotion for _, emotion in turns], language)  # the plain form
        replies = rng.sample(REPLIES[language], len(turns))
        record_turns = []
        for n, ((sentence, emotion), reply) in enumerate(zip(turns, replies), start=1):
            relative = f"audio/{dialogue_id}_{n}.wav"
            voice = turn_voice(speakers[language][speaker_index], emotion, language, rng)
            jobs.append((out / relative, sentence, voice))
            record_turns.append({"turn_id": n, "text": sentence, "emotion": emotion, "split_audio_file": relative,
                                 "response_text": answer if n == len(turns) else reply})
        lines[split].append(json.dumps({"dialogue_id": dialogue_id, "turns": record_turns}, ensure_ascii=False))
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: synthesize(job[0], job[1], job[2], PLAIN_AUDIO_FORMAT), jobs))
    for split, split_lines in lines.items():
        (out / f"HD-Track1-T1-{split}.jsonl").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    rel = Path(os.path.relpath(out, ROOT))
    run([sys.executable, "convert.py", str(rel / "HD-Track1-T1-train.jsonl"), "-o", str(rel / "ann"),
         "--valid-ratio", "0.05", "--seed", str(seed), "--replace"])
    run([sys.executable, "convert.py", str(rel / "HD-Track1-T1-test.jsonl"), "-o", str(rel / "ann"), "--name",
         "test", "--replace"])


def trajectory_corpus(out: Path, num_dialogues: int, num_test: int) -> tuple[Path, Path, list[dict], list[dict]]:
    """The fine-tune's data: Task 1 dialogues, their sub-dialogues and one emotion-recognition sample per turn
    (as the listening experiment trains); (train annotation, test annotation, train dialogues, test dialogues)."""
    if not (out / "ann" / "test.json").is_file():
        build_dialogues(out, num_dialogues, num_test, seed=0)
    ann = out / "ann"
    train, test = dialogues(ann / "train.json"), dialogues(ann / "test.json")
    check_held_out(train + dialogues(ann / "valid.json"), test)
    mixed = write_annotation(ann / "train_mixed.json",
                             train + sub_dialogues(train, plain_answers=True) + turn_samples(train))
    return mixed, ann / "test.json", train, test


# ---------------------------------------------------------------------------------------------- text warm-up
def text_conversation(prompts: dict[str, list[str]], task: str, language: str, slots: list[str],
                      chat_template: bool, rng: random.Random) -> list[dict[str, str]]:
    """The messages of a sample as the model will see them, each speech slot holding the text given for it."""
    prompt = choose_prompt(prompts, prompt_key(prompts, task, language), "", rng)
    turns = [TurnText()] * len(slots) if task == "emotional_trajectory" else None
    messages = conversation(prompt, turns, language, chat_template and turns is not None)
    filled = iter(slots)
    return [{**m, "content": "".join(part if i == 0 else next(filled) + part
                                     for i, part in enumerate(m["content"].split(SPEECH_SLOT)))} for m in messages]


def text_ceiling(llm: Path, test: list[dict]) -> dict[str, float]:
    """The warm-up LLM alone on the test dialogues as text (each turn's transcript in its speech slot, greedy
    decoding): what a connector that made speech read exactly like text could hand the fine-tune at its start."""
    text = ChatText(llm)
    model = AutoModelForCausalLM.from_pretrained(llm, local_files_only=True).eval()
    prompts, rng, answers = load_prompts(str(ROOT / "prompts/test_prompt.json")), random.Random(0), []
    for e in test:
        messages = text_conversation(prompts, e["task"], e["language"], [t["transcript"] for t in e["turns"]],
                                     text.uses_chat_template, rng)
        prompt, _ = text.prompt_ids(text.render(messages))
        with torch.no_grad():
            ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=48, do_sample=False, eos_token_id=text.stop_ids,
                                 pad_token_id=text.pad_id)
        answers.append(text.answer(ids[0, len(prompt):].tolist()))
    scores = emotion_trajectory_scores([[t["emotion"] for t in e["turns"]] for e in test], answers)
    return {"turn_accuracy": scores.turn_accuracy, "exact_match": scores.exact_match,
            "language_match": language_match(answers, [e["language"] for e in test])}


def text_pairs(asr_train: Path, chat_template: bool, count: int,
               seed: int = 0) -> list[tuple[list[dict[str, str]], str]]:
    """`count` (conversation, answer) pairs of text, each drawn afresh (text costs nothing to make, so the warm-up
    never sees a pair twice) and each prompt as the model will see it, the transcript written where the speech
    will go: the LLM learns its tasks in text, as a pretrained LLM would answer them from a transcript, and stage
    1's job is then to make speech read like text. One in five pairs is ASR (copy the slot: a stage-1 clip's
    sentence), one in five emotion recognition (the emotion a training sentence names), the rest trajectories of
    2-4 training sentences (seven in ten closed by the neutral question, as the dialogues are) with the plain
    answer. Only training sentences: the held-out pairs stay for the test dialogues."""
    prompts = load_prompts(str(ROOT / "prompts/train_prompt.json"))
    clips = json.loads(asr_train.read_text())["annotation"]
    sentences = {language: emotion_sentences(language)["train"] for language in ("en", "zh")}
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        language, kind = rng.choice(("en", "zh")), rng.random()
        if kind < 0.2:
            clip = rng.choice(clips)
            task, turns, answer = "asr", [clip["text"]], clip["text"]
            language = clip["language"]
        elif kind < 0.4:
            sentence, emotion = rng.choice(sentences[language])
            task, turns, answer = "emotion_recognition", [sentence], LABEL_WORDS[language][emotion]
        else:
            said = rng.sample(sentences[language], rng.choice([2, 3, 4]))
            if rng.random() < 0.7:
                said.append((rng.choice(QUESTIONS[language]), "neutral"))
            task, turns = "emotional_trajectory", [sentence for sentence, _ in said]
            answer = trajectory_summary([emotion for _, emotion in said], language)
        pairs.append((text_conversation(prompts, task, language, turns, chat_template, rng), answer))
    return pairs


def warm_up_llm(source: Path, target: Path, pairs: list[tuple[list[dict[str, str]], str]], steps: int,
                seed: int = 0, threads: int = 0) -> Path:
    """The LLM folder with its weights trained `steps` steps of WARMUP_BATCH text pairs, taken in order (and
    again from the first when they run out), next-token loss on the answers; saved with the source's tokenizer
    files at `target`. `threads`: torch's threads (0: as it is)."""
    if (target / "model.safetensors").is_file():
        return target
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    text = ChatText(source)
    rows = []
    for messages, answer in pairs:
        prompt, _ = text.prompt_ids(text.render(messages))
        rows.append((prompt, text.target_ids(answer)[0]))
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # 30 steps up, then linearly down to 0
        optimizer, lambda step: min(1.0, (step + 1) / 30) * (1.0 - step / steps))
    for step in range(steps):
        batch = [rows[(step * WARMUP_BATCH + b) % len(rows)] for b in range(WARMUP_BATCH)]
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), text.pad_id)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX)
        for b, (p, t) in enumerate(batch):
            ids[b, :len(p) + len(t)] = torch.tensor(p + t)
            mask[b, :len(p) + len(t)] = 1
            labels[b, len(p):len(p) + len(t)] = torch.tensor(t)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  text warm-up {source.name} step {step + 1}/{steps}: loss {loss.item():.3f}", flush=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    model.save_pretrained(staging)
    staging.rename(target)
    return target


def warm_up_all(names: list[str], out: Path, asr_train: Path, steps: int) -> dict[str, Path]:
    """`warm_up_llm` for each LLM, side by side in processes of their own (the cores split between them)."""
    threads = max(1, (os.cpu_count() or 1) // len(names))
    with ProcessPoolExecutor(len(names), mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {name: pool.submit(warm_up_llm, LLMS[name], out / f"llm_{name}",
                                  text_pairs(asr_train, ChatText(LLMS[name]).uses_chat_template,
                                             steps * WARMUP_BATCH), steps,
                                  threads=threads)
                for name in names}
        return {name: job.result() for name, job in jobs.items()}


# ---------------------------------------------------------------------------------------------- runs
def train_command(options: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--cfg-path", CONFIG, "--options", *options]


def stage1_options(llm: Path, asr: tuple[Path, Path], out: Path, steps: int, lr: float) -> list[str]:
    valid = len(json.loads(asr[1].read_text())["annotation"])
    return [f"model.llm_path={llm}", "model.lora=false", "model.ckpt=''", f"datasets.train_ann_path={asr[0]}",
            f"datasets.valid_ann_path={asr[1]}", "datasets.test_ann_path=''", f"run.output_dir={out}",
            f"run.iters_per_epoch={steps}", "run.optims.max_epoch=1", f"run.optims.init_lr={lr}",
            f"run.optims.min_lr={lr / 10}", f"run.valid_every_steps={max(1, steps // STAGE1_VALIDATIONS)}",
            f"run.valid_decode_samples={valid}", *STAGE1_DECODE]


def finetune_options(llm: Path, start: str, train_ann: Path, test_ann: Path, out: Path, steps: int,
                     seed: int) -> list[str]:
    """start: a stage-1 checkpoint, or '' for a fresh connector; '+silenced' after it silences every clip.
    Validation is the teacher-forced loss and token accuracy of the held-out test dialogues' answers (nothing
    is selected by it: the last step is evaluated)."""
    ckpt, silenced = start.removesuffix("+silenced"), start.endswith("+silenced")
    return [f"model.llm_path={llm}", f"model.ckpt={ckpt or repr('')}", f"datasets.train_ann_path={train_ann}",
            f"datasets.valid_ann_path={test_ann}", f"datasets.test_ann_path={test_ann}",
            f"datasets.silence_audio={str(silenced).lower()}", f"run.output_dir={out}", f"run.seed={seed}",
            f"run.iters_per_epoch={steps}", "run.optims.max_epoch=1",
            f"run.valid_every_steps={max(1, steps // FINETUNE_VALIDATIONS)}", *DECODE]


def validations(run_dir: Path) -> list[dict[str, float]]:
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                        if line.strip()) if r["kind"] == "valid"]


def stage1_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validations of a stage-1 run: step, and WER/CER with the audio and silenced."""
    return [{k: v for k, v in r.items() if k == "step" or "/asr/" in k or k.startswith("asr/")}
            for r in validations(run_dir)]


def finetune_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validations of a fine-tune: step, held-out answer loss and token accuracy (teacher-forced)."""
    return [{"step": r["step"], "loss": r["loss"], "acc": 100.0 * r["acc"]} for r in validations(run_dir)]


def zh_language_match(predictions: Path) -> float:
    zh = [r["prediction"] for r in read_predictions(predictions) if r["language"] == "zh"]
    return language_match(zh, ["zh"] * len(zh))


def plot(curves: dict[str, list[dict[str, float]]], ft_curves: dict[tuple, list[dict[str, float]]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(curves), figsize=(5.5 * len(curves), 6.8), squeeze=False)
    for ax, (llm, curve) in zip(axes[0], curves.items()):
        steps = [c["step"] for c in curve]
        for metric, color in (("asr/en/wer", "tab:blue"), ("asr/zh/cer", "tab:red")):
            ax.plot(steps, [c[metric] for c in curve], color=color, label=f"{metric[4:]} with audio")
            ax.plot(steps, [c[f"silenced/{metric}"] for c in curve], color=color, linestyle="--",
                    label=f"{metric[4:]} silenced")
        ax.set_title(f"stage 1, tiny {llm}: held-out voice")
        ax.set_xlabel("stage-1 step")
        ax.set_ylabel("error rate (%)")
        ax.legend(fontsize=8)
    colors = {"stage 1": "tab:green", "fresh": "tab:orange", "stage 1, silenced": "tab:grey"}
    for ax, llm in zip(axes[1], curves):
        for (name, start, seed), curve in ft_curves.items():
            if name == llm:
                ax.plot([c["step"] for c in curve], [c["loss"] for c in curve], color=colors[start], marker=".",
                        label=f"from {start}" if seed == min(s for n, st, s in ft_curves if st == start) else None)
        ax.set_title(f"fine-tune, tiny {llm}: held-out answers")
        ax.set_xlabel("fine-tune step")
        ax.set_ylabel("teacher-forced loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def cell(values: list[float]) -> str:
    """The mean, and each seed's value when there are several."""
    text = f"{mean(values):.1f}"
    return text if len(values) == 1 else f"{text} ({' / '.join(f'{v:.1f}' for v in values)})"


def report(curves: dict, finetunes: dict, ft_curves: dict, seeds: list[int], seconds: float, n_test: int,
           before: dict[tuple[str, str], dict[str, float]]) -> str:
    lines = ["Stage 1 (connector only, ASR), held-out voice, last validation:", "",
             "| LLM | step | en WER audio | en WER silenced | zh CER audio | zh CER silenced |",
             "|---|---|---|---|---|---|"]
    for llm, curve in curves.items():
        c = curve[-1]
        lines.append(f"| {llm} | {c['step']} | {c['asr/en/wer']:.1f} | {c['silenced/asr/en/wer']:.1f} | "
                     f"{c['asr/zh/cer']:.1f} | {c['silenced/asr/zh/cer']:.1f} |")
    lines += ["", (f"Emotional-trajectory fine-tune, {n_test} held-out dialogues, last step, seeds {seeds} "
                   "(mean, then each seed):"), "",
              ("| LLM | start | held-out loss | held-out token acc % | per turn % | exact % | language match % "
               "| zh answered in Chinese % |"), "|---|---|---|---|---|---|---|---|"]
    for llm, start in dict.fromkeys((k[0], k[1]) for k in finetunes):
        rows = [finetunes[llm, start, seed] for seed in seeds]
        last = [ft_curves[llm, start, seed][-1] for seed in seeds]
        lines.append(f"| {llm} | {start} | {mean([c['loss'] for c in last]):.3f} | {cell([c['acc'] for c in last])} | "
                     + " | ".join(cell([r[key] for r in rows]) for key in
                                  ("turn_accuracy", "exact_match", "language_match", "zh_language_match")) + " |")
    inputs = {"text": "text: the warm-up LLM, transcripts in the speech slots (the text ceiling)",
              "audio": "audio: the stage-1 model as it is, no fine-tune"}
    lines += ["", "Before the fine-tune, the test dialogues:", "",
              "| LLM | input | per turn % | exact % | language match % |", "|---|---|---|---|---|"]
    lines += [f"| {llm} | {inputs[kind]} | {c['turn_accuracy']:.1f} | {c['exact_match']:.1f} | "
              f"{c['language_match']:.1f} |" for (llm, kind), c in sorted(before.items())]
    lines += ["", "Held-out loss over the fine-tune steps (mean over seeds):", "",
              "| LLM | start | " + " | ".join(f"step {c['step']}" for c in next(iter(ft_curves.values()))) + " |",
              "|---|---|" + "---|" * len(next(iter(ft_curves.values())))]
    for llm, start in dict.fromkeys((k[0], k[1]) for k in finetunes):
        columns = zip(*(ft_curves[llm, start, seed] for seed in seeds))
        lines.append(f"| {llm} | {start} | " + " | ".join(f"{mean([c['loss'] for c in col]):.3f}" for col in columns)
                     + " |")
    lines += ["", f"The whole experiment took {seconds / 60:.1f} min on {os.cpu_count()} cores."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/alignment", help="corpora, LLMs, runs and the report")
    ap.add_argument("--llms", nargs="+", choices=list(LLMS), default=list(LLMS))
    ap.add_argument("--num-dialogues", type=int, default=400, help="Task 1 dialogues of the fine-tune corpus")
    ap.add_argument("--num-test", type=int, default=80, help="of which held-out test dialogues")
    ap.add_argument("--warmup-steps", type=int, default=600, help="text warm-up steps of each tiny LLM")
    ap.add_argument("--stage1-steps", type=int, default=1600)
    ap.add_argument("--stage1-lr", type=float, default=2e-3)
    ap.add_argument("--finetune-steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43], help="run.seed of each fine-tune")
    args = ap.parse_args(argv)
    started = time.time()
    out = ROOT / args.out
    asr = asr_corpus(out / "asr", seed=0, valid_per_language=STAGE1_VALID_PER_LANGUAGE)
    train_ann, test_ann, train, test = trajectory_corpus(out / "trajectory", args.num_dialogues, args.num_test)
    print(f"corpora ready ({(time.time() - started) / 60:.1f} min)", flush=True)
    llms = warm_up_all(args.llms, out, asr[0], args.warmup_steps)
    print(f"text warm-up done ({(time.time() - started) / 60:.1f} min)", flush=True)

    stage1 = {name: out / f"stage1_{name}" for name in llms}
    todo = {name: train_command(stage1_options(llms[name], asr, stage1[name], args.stage1_steps, args.stage1_lr))
            for name in llms if finished(stage1[name], args.stage1_steps) is None}
    if todo:
        run_together(todo, {name: stage1[name] / "console.log" for name in todo})
    print(f"stage 1 done ({(time.time() - started) / 60:.1f} min)", flush=True)
    starts = {"stage 1": lambda n: str(finished(stage1[n], args.stage1_steps)), "fresh": lambda n: "",
              "stage 1, silenced": lambda n: str(finished(stage1[n], args.stage1_steps)) + "+silenced"}
    runs = {(name, start, seed): out / f"finetune_{name}_{start.replace(' ', '').replace(',', '_')}_seed{seed}"
            for seed in args.seeds for start in starts for name in llms}
    commands = {key: train_command(finetune_options(llms[key[0]], starts[key[1]](key[0]), train_ann, test_ann,
                                                    run_dir, args.finetune_steps, key[2]))
                for key, run_dir in runs.items() if finished(run_dir, args.finetune_steps) is None}
    run_in_rounds(commands, {key: runs[key] / "console.log" for key in commands}, 2)  # two side by side
    print(f"fine-tunes done ({(time.time() - started) / 60:.1f} min)", flush=True)
    # each fine-tune's last step, and each stage-1 model as it is (its checkpoint has no LoRA)
    decoded = {key: (run_dir, llms[key[0]], finished(run_dir, args.finetune_steps), [])
               for key, run_dir in runs.items()}
    decoded |= {name: (stage1[name], llms[name], finished(stage1[name], args.stage1_steps), ["model.lora=false"])
                for name in llms}
    evaluations = {key: [sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(test_ann), "--out-dir",
                         str(run_dir / "eval"), "--options", f"model.llm_path={llm}", f"model.ckpt={ckpt}", *extra,
                         *DECODE]
                   for key, (run_dir, llm, ckpt, extra) in decoded.items()
                   if not (run_dir / "eval/predictions.jsonl").is_file()}
    run_in_rounds(evaluations, {key: decoded[key][0] / "eval.log" for key in evaluations}, 2)

    curves = {name: stage1_curve(stage1[name]) for name in llms}
    ft_curves = {key: finetune_curve(run_dir) for key, run_dir in runs.items()}
    finetunes = {key: {**score(run_dir / "eval/predictions.jsonl", test),
                       "zh_language_match": zh_language_match(run_dir / "eval/predictions.jsonl")}
                 for key, run_dir in runs.items()}
    before = {(name, "text"): text_ceiling(llms[name], test) for name in llms}
    before.update({(name, "audio"): score(stage1[name] / "eval/predictions.jsonl", test) for name in llms})
    text = report(curves, finetunes, ft_curves, args.seeds, time.time() - started, len(test), before)
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps(
        {"stage1": curves, "before_finetune": {f"{k[0]} / {k[1]}": v for k, v in before.items()},
         "finetune": {f"{k[0]} / {k[1]} / seed {k[2]}": {**v, "curve": ft_curves[k]}
                                        for k, v in finetunes.items()},
         "args": vars(args), "minutes": (time.time() - started) / 60}, indent=1, ensure_ascii=False))
    plot(curves, ft_curves, out / "report.png")
    print(text)
    print(f"wrote {out / 'report.md'}, report.json and report.png")
    return 0


def finished(run_dir: Path, steps: int) -> Path | None:
    """The run's checkpoint at its last step, None while it has not got there (a rerun trains only what is left)."""
    path = run_dir / f"checkpoint_step{steps}.pth"
    return path if path.is_file() else None


if __name__ == "__main__":
    sys.exit(main())

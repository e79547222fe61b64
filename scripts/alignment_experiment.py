"""Does staged training align a connector to a new LLM? The tiny LLaMA and the tiny Qwen3, each through stage 1
(connector only, ASR) and then the HumDial-shaped emotional-trajectory fine-tune, against the same fine-tune from
an unaligned connector and with the audio silenced (docs/alignment_experiment.md; docs/training.md).

    python -m scripts.alignment_experiment                  # both LLMs; prints and saves the tables and the plot
    python -m scripts.alignment_experiment --llms qwen --stage1-steps 400 --finetune-steps 300   # quicker

Steps (each one a plain command of this repo, printed as it runs; the two LLMs run side by side):
1. Corpora, made here with espeak-ng: stage 1's ASR clips (the demo corpus's English and Chinese sentences,
   each spoken by six voices; the sixth voice's clips are held out), and a HumDial-shaped Task 1 corpus
   (`scripts/make_demo_corpus.py --tasks 1`, held-out test dialogues).
2. Text warm-up of each tiny LLM: the tiny LLMs were never pretrained, so each first learns, from text alone, the
   answers it will have to give (the sentences, the trajectory answers, the emotion words) after their prompts,
   as a real LLM knows its language before any speech reaches it. Written to <out>/llm_<name>/.
3. Stage 1: `train.py` on the ASR clips with `model.lora: false` (the Q-Former and projection learn, the LLM is
   frozen), validating every `--stage1-steps / 8` steps on the held-out voices with the alignment check (each
   clip decoded with its audio and silenced): WER (en) and CER (zh) over the steps.
4. The fine-tune, three ways at equal steps: from the stage-1 connector (`model.ckpt`: its LoRA starts fresh),
   from a fresh connector, and from the stage-1 connector with every clip silenced. `evaluate.py` decodes the
   held-out dialogues: per-turn trajectory accuracy, exact sequence, and language match (Chinese dialogues
   answered in Chinese).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from metrics import EMOTIONS, language_match
from models.llm import IGNORE_INDEX, ChatText
from prompting import choose_prompt, conversation, load_prompts, prompt_key
from scripts.learning_experiment import (check_held_out, dialogues, read_predictions, run, run_together, score,
                                         sub_dialogues, turn_samples, write_annotation)
from scripts.make_demo_corpus import (HELD_OUT_SENTENCES, PLAIN_AUDIO_FORMAT, SENTENCES, make_speakers, synthesize,
                                      turn_voice)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_learning.yaml"  # the tiny connector and LoRA of the listening experiment
LLMS = {"llama": ROOT / "assets/tiny/llama", "qwen": ROOT / "assets/tiny/qwen"}
HELD_OUT_VOICE = 5  # of make_speakers' six per language: its clips are stage 1's validation set
DECODE = ["generate.num_beams=1", "generate.max_new_tokens=48"]


# ---------------------------------------------------------------------------------------------- corpora
def asr_corpus(out: Path, seed: int) -> tuple[Path, Path]:
    """Stage 1's clips: every demo sentence (en, zh) in each of six voices, with a random emotion's prosody;
    (train.json, valid.json) in the original annotation format, the held-out voice in valid."""
    if (out / "valid.json").is_file():
        return out / "train.json", out / "valid.json"
    rng = random.Random(seed)
    speakers = make_speakers(rng)
    jobs, entries = [], {"train": [], "valid": []}
    for language in ("en", "zh"):
        for s, sentence in enumerate(SENTENCES[language] + HELD_OUT_SENTENCES[language]):
            for v, speaker in enumerate(speakers[language]):
                voice = turn_voice(speaker, rng.choice(EMOTIONS), language, rng)
                name = f"{language}_{s:02d}_v{v}.wav"
                jobs.append((out / "audio" / name, sentence, voice))
                split = "valid" if v == HELD_OUT_VOICE else "train"
                entries[split].append({"id": name[:-4], "path": f"audio/{name}", "text": sentence, "task": "asr",
                                       "language": language})
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: synthesize(job[0], job[1], job[2], PLAIN_AUDIO_FORMAT), jobs))
    for split, items in entries.items():
        write_annotation(out / f"{split}.json", items)
    return out / "train.json", out / "valid.json"


def trajectory_corpus(out: Path, num_dialogues: int) -> tuple[Path, Path, list[dict], list[dict]]:
    """The fine-tune's data: Task 1 dialogues, their sub-dialogues and one emotion-recognition sample per turn
    (as the listening experiment trains); (train annotation, test annotation, train dialogues, test dialogues)."""
    if not (out / "ann" / "test.json").is_file():
        run([sys.executable, "-m", "scripts.make_demo_corpus", "--num-dialogues", str(num_dialogues), "--tasks", "1",
             "--out", str(out), "--plain-audio"])
    ann = out / "ann"
    train, test = dialogues(ann / "train.json"), dialogues(ann / "test.json")
    check_held_out(train + dialogues(ann / "valid.json"), test)
    mixed = write_annotation(ann / "train_mixed.json", train + sub_dialogues(train) + turn_samples(train))
    return mixed, ann / "test.json", train, test


# ---------------------------------------------------------------------------------------------- text warm-up
def text_pairs(asr_train: Path, dialogs: list[dict]) -> list[tuple[list[dict[str, str]], str]]:
    """(conversation, answer) pairs of text: each prompt as the model will see it, its speech slot empty or (ASR)
    holding the transcript."""
    prompts = load_prompts(str(ROOT / "prompts/train_prompt.json"))
    rng = random.Random(0)

    def asked(task: str, language: str, answer: str, slot: str = "") -> tuple[list[dict[str, str]], str]:
        prompt = choose_prompt(prompts, prompt_key(prompts, task, language), "", rng)
        return conversation(prompt.replace("<SpeechHere>", slot), None, language, False), answer

    # ASR with the transcript written where the speech will go: the LLM learns to read its speech slot, the
    # copying a pretrained LLM already does with text in its context (stage 1 then makes speech read like text)
    pairs = [asked("asr", e["language"], e["text"], slot=e["text"])
             for e in json.loads(asr_train.read_text())["annotation"]]
    pairs += [asked(e["task"], e["language"], e["text"]) for e in dialogs]
    pairs += [asked(e["task"], e["language"], e["text"]) for e in turn_samples(dialogs)]
    return pairs


def warm_up_llm(source: Path, target: Path, pairs: list[tuple[list[dict[str, str]], str]], steps: int,
                seed: int = 0) -> Path:
    """The LLM folder with its weights trained `steps` steps on the text pairs (next-token loss on the answers),
    saved with the source's tokenizer files at `target`."""
    if (target / "model.safetensors").is_file():
        return target
    torch.manual_seed(seed)
    text = ChatText(source)
    rows = []
    for messages, answer in pairs:
        prompt, _ = text.prompt_ids(text.render(messages))
        rows.append((prompt, text.target_ids(answer)[0]))
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / steps)
    rng = random.Random(seed)
    for step in range(steps):
        batch = rng.sample(rows, min(32, len(rows)))
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


# ---------------------------------------------------------------------------------------------- runs
def run_all(commands: dict, logs: dict) -> None:
    """`run_together` on the commands still to run (none: nothing to do)."""
    if commands:
        run_together(commands, {key: logs[key] for key in commands})


def train_command(options: list[str]) -> list[str]:
    return [sys.executable, "train.py", "--cfg-path", CONFIG, "--options", *options]


def stage1_options(llm: Path, asr: tuple[Path, Path], out: Path, steps: int) -> list[str]:
    valid = len(json.loads(asr[1].read_text())["annotation"])
    return [f"model.llm_path={llm}", "model.lora=false", "model.ckpt=''", f"datasets.train_ann_path={asr[0]}",
            f"datasets.valid_ann_path={asr[1]}", "datasets.test_ann_path=''", f"run.output_dir={out}",
            f"run.iters_per_epoch={steps}", "run.optims.max_epoch=1", f"run.valid_every_steps={max(1, steps // 8)}",
            f"run.valid_decode_samples={valid}", *DECODE]


def finetune_options(llm: Path, start: str, train_ann: Path, ann: Path, out: Path, steps: int) -> list[str]:
    """start: a stage-1 checkpoint, or '' for a fresh connector; '+silenced' after it silences every clip."""
    ckpt, silenced = start.removesuffix("+silenced"), start.endswith("+silenced")
    return [f"model.llm_path={llm}", f"model.ckpt={ckpt or repr('')}", f"datasets.train_ann_path={train_ann}",
            f"datasets.valid_ann_path={ann / 'valid.json'}", f"datasets.test_ann_path={ann / 'test.json'}",
            f"datasets.silence_audio={str(silenced).lower()}", f"run.output_dir={out}",
            f"run.iters_per_epoch={steps}", "run.optims.max_epoch=1", *DECODE]


def stage1_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validations of a stage-1 run: step, and WER/CER with the audio and silenced."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k == "step" or "/asr/" in k or k.startswith("asr/")}
            for r in records if r["kind"] == "valid"]


def zh_language_match(predictions: Path) -> float:
    zh = [r["prediction"] for r in read_predictions(predictions) if r["language"] == "zh"]
    return language_match(zh, ["zh"] * len(zh))


def plot(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.6), squeeze=False)
    for ax, (llm, curve) in zip(axes[0], curves.items()):
        steps = [c["step"] for c in curve]
        for metric, color in (("asr/en/wer", "tab:blue"), ("asr/zh/cer", "tab:red")):
            ax.plot(steps, [c[metric] for c in curve], color=color, label=f"{metric[4:]} with audio")
            ax.plot(steps, [c[f"silenced/{metric}"] for c in curve], color=color, linestyle="--",
                    label=f"{metric[4:]} silenced")
        ax.set_title(f"stage 1, tiny {llm}: held-out voices")
        ax.set_xlabel("step")
        ax.set_ylabel("error rate (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(curves: dict, finetunes: dict, seconds: float, n_test: int) -> str:
    lines = ["Stage 1 (connector only, ASR), held-out voices, last validation:", "",
             "| LLM | step | en WER audio | en WER silenced | zh CER audio | zh CER silenced |", "|---|---|---|---|---|---|"]
    for llm, curve in curves.items():
        c = curve[-1]
        lines.append(f"| {llm} | {c['step']} | {c['asr/en/wer']:.1f} | {c['silenced/asr/en/wer']:.1f} | "
                     f"{c['asr/zh/cer']:.1f} | {c['silenced/asr/zh/cer']:.1f} |")
    lines += ["", f"Emotional-trajectory fine-tune, {n_test} held-out dialogues (equal steps per LLM):", "",
              "| LLM | start | per turn % | exact % | language match % | zh answered in Chinese % |",
              "|---|---|---|---|---|---|"]
    for (llm, start), row in finetunes.items():
        lines.append(f"| {llm} | {start} | {row['turn_accuracy']:.1f} | {row['exact_match']:.1f} | "
                     f"{row['language_match']:.1f} | {row['zh_language_match']:.1f} |")
    lines += ["", f"The whole experiment took {seconds / 60:.1f} min on {os.cpu_count()} cores."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/alignment", help="corpora, LLMs, runs and the report")
    ap.add_argument("--llms", nargs="+", choices=list(LLMS), default=list(LLMS))
    ap.add_argument("--num-dialogues", type=int, default=400, help="Task 1 dialogues of the fine-tune corpus")
    ap.add_argument("--warmup-steps", type=int, default=600, help="text warm-up steps of each tiny LLM")
    ap.add_argument("--stage1-steps", type=int, default=1600)
    ap.add_argument("--finetune-steps", type=int, default=600)
    args = ap.parse_args(argv)
    started = time.time()
    out = ROOT / args.out
    asr = asr_corpus(out / "asr", seed=0)
    train_ann, test_ann, train, test = trajectory_corpus(out / "trajectory", args.num_dialogues)
    pairs = text_pairs(asr[0], train)
    llms = {name: warm_up_llm(LLMS[name], out / f"llm_{name}", pairs, args.warmup_steps) for name in args.llms}

    stage1 = {name: out / f"stage1_{name}" for name in llms}
    run_all({name: train_command(stage1_options(llms[name], asr, stage1[name], args.stage1_steps))
             for name in llms if not (stage1[name] / "checkpoint_best.pth").is_file()},
            {name: stage1[name] / "console.log" for name in llms})
    starts = {"stage 1": lambda n: str(stage1[n] / "checkpoint_best.pth"), "fresh": lambda n: "",
              "stage 1, silenced": lambda n: str(stage1[n] / "checkpoint_best.pth") + "+silenced"}
    ann = test_ann.parent
    runs = {(name, start): out / f"finetune_{name}_{start.replace(' ', '').replace(',', '_')}"
            for name in llms for start in starts}
    for start, ckpt in starts.items():  # one start at a time, the LLMs side by side
        run_all({(n, start): train_command(finetune_options(llms[n], ckpt(n), train_ann, ann, runs[n, start],
                                                            args.finetune_steps))
                 for n in llms if not (runs[n, start] / "checkpoint_best.pth").is_file()},
                {(n, start): runs[n, start] / "console.log" for n in llms})
    evaluations = {key: [sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(test_ann), "--out-dir",
                         str(run_dir / "eval"), "--options", f"model.llm_path={llms[key[0]]}",
                         f"model.ckpt={run_dir / 'checkpoint_best.pth'}", *DECODE]
                   for key, run_dir in runs.items() if not (run_dir / "eval/predictions.jsonl").is_file()}
    for key, command in evaluations.items():
        run_all({key: command}, {key: runs[key] / "eval.log"})

    curves = {name: stage1_curve(stage1[name]) for name in llms}
    finetunes = {key: {**score(run_dir / "eval/predictions.jsonl", test),
                       "zh_language_match": zh_language_match(run_dir / "eval/predictions.jsonl")}
                 for key, run_dir in runs.items()}
    text = report(curves, finetunes, time.time() - started, len(test))
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "report.json").write_text(json.dumps({"stage1": curves, "finetune": {f"{k[0]} / {k[1]}": v for k, v in
                                                                                finetunes.items()}}, indent=1))
    plot(curves, out / "report.png")
    print(text)
    print(f"wrote {out / 'report.md'}, report.json and report.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

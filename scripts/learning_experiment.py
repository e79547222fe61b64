"""Does the model listen? Train the tiny model on synthetic dialogues whose only emotion cue is prosody, with the
audio and with the audio silenced, and score both on held-out dialogues.

    python -m scripts.learning_experiment            # about 15 min on 2 CPU cores; prints and saves the table

Steps (each one a plain command of this repo, printed as it runs):
1. `scripts/make_demo_corpus.py` generates a corpus: espeak-ng voices whose pitch, rate and volume follow the
   turn's emotion, sentences without emotion words, held-out dialogues with unseen sentences.
2. `train.py --cfg-path configs/demo_learning.yaml` trains on four kinds of samples, all built from the training
   dialogues only: the dialogues; their sub-dialogues (every run of 2 or more consecutive turns, with the
   trajectory answer of those turns); recombined dialogues (one speaker's statements from several of their
   dialogues, with the trajectory answer: new label sequences, so the model must listen to each turn rather
   than memorise sequences); and one emotion-recognition sample per turn (multi-task, as SALMONN is trained).
   It trains once with the audio and once with `datasets.silence_audio=true` (every clip replaced by zeros of
   the same length: the model can learn the answer's form and the label prior, not the emotions). The two runs
   share the cores.
3. `evaluate.py` decodes the held-out test dialogues of each run; emotion-trajectory accuracy (per turn and
   exact sequence, `humdial.trajectory.emotion_trajectory_scores`) is computed from its predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from humdial.trajectory import emotion_trajectory_scores, scored_turns, turn_hits
from metrics import EMOTIONS, canonical_emotion, extract_emotions, language_match
from tools.demo_answers import LABEL_WORDS, trajectory_summary

ROOT = Path(__file__).resolve().parents[1]

CONFIG = "configs/demo_learning.yaml"
RUNS = {"audio": ["datasets.silence_audio=false"], "audio silenced": ["datasets.silence_audio=true"]}
# --compare-turn-modes: the audio run in each turn mode (README "Turn modes"). The tiny Whisper's window is 5 s
# (assets/tiny/whisper_5s), so per_turn untrimmed pads each turn to 5 s (14 tokens); concat gets the 30 s window
# of assets/tiny/whisper, as the original fine-tune cuts the joined turns at 30 s (88 tokens). (d) separates
# trimming from packing: (c)'s variable-length slots without sharing clips.
TURN_MODES = {
    "concat (a)": ["datasets.turn_mode=concat", "model.trim_speech_padding=false",
                   "model.whisper_path=assets/tiny/whisper"],
    "per_turn untrimmed (b)": ["datasets.turn_mode=per_turn", "model.trim_speech_padding=false"],
    "packed + trimmed + padding-free (c)": ["datasets.turn_mode=packed", "model.trim_speech_padding=true",
                                            "run.padding_free=true"],
    "per_turn trimmed (d)": ["datasets.turn_mode=per_turn", "model.trim_speech_padding=true"],
}


def run(cmd: list[str]) -> float:
    """Runs one step of the experiment, failing loudly; returns its wall time in seconds."""
    print("+ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    return time.time() - start


def run_in_rounds(commands: dict[str, list[str]], logs: dict[str, Path], at_once: int) -> dict[str, float]:
    """`run_together` on `at_once` commands at a time (memory and cores allow only a few side by side)."""
    names, seconds = list(commands), {}
    for start in range(0, len(names), at_once):
        round_names = names[start:start + at_once]
        seconds |= run_together({n: commands[n] for n in round_names}, {n: logs[n] for n in round_names})
    return seconds


def run_together(commands: dict[str, list[str]], logs: dict[str, Path]) -> dict[str, float]:
    """Runs the commands at the same time, the cores split between them (each log to its file); fails loudly
    with the end of the failed command's log. Returns each command's wall time in seconds."""
    threads = max(1, (os.cpu_count() or 1) // len(commands))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started, procs, seconds = time.time(), {}, {}
    for name, cmd in commands.items():
        print(f"+ {' '.join(cmd)}  > {logs[name]}", flush=True)
        logs[name].parent.mkdir(parents=True, exist_ok=True)
        with logs[name].open("w") as log:
            procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    while len(seconds) < len(procs):  # each command's own end time, whichever finishes first
        for name, proc in procs.items():
            if name not in seconds and proc.poll() is not None:
                seconds[name] = time.time() - started
        time.sleep(0.2)
    failed = [name for name, proc in procs.items() if proc.returncode != 0]
    if failed:
        tails = "\n".join(f"--- {logs[n]} (last lines)\n" + "\n".join(logs[n].read_text().splitlines()[-20:])
                          for n in failed)
        raise RuntimeError(f"{', '.join(failed)} failed:\n{tails}")
    return seconds


def dialogues(ann_path: Path) -> list[dict]:
    """The emotional-trajectory dialogues of an annotation file."""
    return [e for e in json.loads(ann_path.read_text(encoding="utf-8"))["annotation"]
            if "turns" in e and e["task"] == "emotional_trajectory"]


def turn_samples(dialogs: list[dict]) -> list[dict]:
    """One `emotion_recognition` sample per dialogue turn: the turn's audio -> its emotion word (the word the
    trajectory answers use). For training: multi-task data; for testing: does the model hear a single turn?"""
    return [{"id": f"{e['id']}_turn{k}", "path": t["path"], "task": "emotion_recognition", "Q": "",
             "language": e["language"], "text": LABEL_WORDS[e["language"]][t["emotion"]]}
            for e in dialogs for k, t in enumerate(e["turns"], start=1)]


def sub_dialogues(dialogs: list[dict], plain_answers: bool = False) -> list[dict]:
    """Every run of 2 or more consecutive turns that is not the whole dialogue, as a dialogue of its own with its
    trajectory answer. The question stays the dialogue's (it asks about the turns shown)."""
    subs = []
    for e in dialogs:
        n = len(e["turns"])
        for length in range(2, n):
            for first in range(n - length + 1):
                turns = e["turns"][first:first + length]
                subs.append({**e, "id": f"{e['id']}_turns{first + 1}-{first + length}", "turns": turns,
                             "text": trajectory_summary([t["emotion"] for t in turns], e["language"],
                                                        None if plain_answers
                                                        else random.Random(f"{e['id']}:{first}:{length}"))})
    return subs


def speaker_of(dialogue_id: str) -> str:
    """The demo corpus names dialogues `<language>_<speaker>_<index>` (scripts/make_demo_corpus.py)."""
    return "_".join(dialogue_id.split("_")[:2])


def recombined_dialogues(dialogs: list[dict], count: int, seed: int = 0, plain_answers: bool = False) -> list[dict]:
    """`count` new dialogues, each from one speaker's turns: 2-4 of the speaker's statements (from any of their
    dialogues, in random order), then the closing question of one of them, with the trajectory answer. The label
    sequences are new, so they cannot be memorised: only hearing each turn, and knowing which turn is which,
    answers them."""
    rng = random.Random(seed)
    by_speaker: dict[str, list[dict]] = {}
    for e in dialogs:
        by_speaker.setdefault(speaker_of(e["id"]), []).append(e)
    made = []
    for i in range(count):
        base = rng.choice(dialogs)
        statements = [t for e in by_speaker[speaker_of(base["id"])] for t in e["turns"][:-1]]
        turns = rng.sample(statements, min(len(statements), rng.choice([2, 3, 4]))) + [base["turns"][-1]]
        made.append({**base, "id": f"{base['id']}_recombined{i + 1}", "turns": turns,
                     "text": trajectory_summary([t["emotion"] for t in turns], base["language"],
                                                None if plain_answers else rng)})
    return made


def write_annotation(path: Path, entries: list[dict]) -> Path:
    """Written beside the corpus annotation, so the relative audio paths stay valid."""
    path.write_text(json.dumps({"annotation": entries}, ensure_ascii=False), encoding="utf-8")
    return path


def check_held_out(train: list[dict], test: list[dict]) -> None:
    """Scores must come from dialogues the model never trained on."""
    shared = {e["id"] for e in train} & {e["id"] for e in test}
    if shared:
        raise ValueError(f"{len(shared)} test dialogues are also training dialogues, e.g. {sorted(shared)[:3]}")


def chance_levels(train: list[dict], test: list[dict]) -> dict[str, float]:
    """Accuracy of guessing: uniformly, and always answering the training set's most common label, over the
    trajectory's scored turns (`majority`) and over every single turn (`turn_majority`: the closing questions
    are neutral, so neutral is common there)."""
    def majority_accuracy(turns_of) -> float:
        prior = Counter(label for e in train for label in turns_of(e))
        majority = prior.most_common(1)[0][0]
        gold = [label for e in test for label in turns_of(e)]
        return 100.0 * sum(g == majority for g in gold) / len(gold)

    def every_turn(e: dict) -> list[str]:
        return [canonical_emotion(t["emotion"]) for t in e["turns"]]

    return {"uniform": 100.0 / len(EMOTIONS), "majority": majority_accuracy(lambda e: scored_turns(every_turn(e))),
            "turn_majority": majority_accuracy(every_turn)}


def read_predictions(path: Path) -> list[dict]:
    """evaluate.py's predictions.jsonl."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def score(predictions: Path, test: list[dict]) -> dict[str, float]:
    """Emotion-trajectory scores of one run, over exactly the held-out dialogues."""
    records = read_predictions(predictions)
    by_id = {r["id"]: r for r in records}
    missing = [e["id"] for e in test if e["id"] not in by_id]
    if missing or len(by_id) != len(test):
        raise ValueError(f"{predictions}: predictions do not cover the held-out set exactly (missing {missing[:3]}, "
                         f"{len(by_id)} predictions for {len(test)} dialogues)")
    gold = [[t["emotion"] for t in e["turns"]] for e in test]
    answers = [by_id[e["id"]]["prediction"] for e in test]
    scores = emotion_trajectory_scores(gold, answers)
    return {"turn_accuracy": scores.turn_accuracy, "exact_match": scores.exact_match,
            "by_position": accuracy_by_position(gold, answers),
            "language_match": language_match(answers, [e["language"] for e in test])}


def accuracy_by_position(gold: list[list[str]], answers: list[str]) -> list[float]:
    """Per-turn accuracy at each scored turn position (1st, 2nd, ...), the metric's own alignment: a model that
    hears every turn but routes the later ones badly shows it here, not in single-turn recognition."""
    hits: dict[int, list[bool]] = {}
    for labels, answer in zip(gold, answers):
        for k, hit in enumerate(turn_hits(labels, answer)):
            hits.setdefault(k, []).append(hit)
    return [100.0 * sum(hits[k]) / len(hits[k]) for k in sorted(hits)]


def seed_summary(rows: dict[str, dict], variant_of: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """Per variant, each score over its seeds as [mean, lowest, highest]: with seeds this far apart (the tiny
    model routes turns well at one seed and badly at another), one run per mode says little."""
    summary: dict[str, dict[str, list[float]]] = {}
    for variant in dict.fromkeys(variant_of.values()):
        runs = [rows[name] for name, v in variant_of.items() if v == variant]
        summary[variant] = {key: [sum(r[key] for r in runs) / len(runs), min(r[key] for r in runs),
                                  max(r[key] for r in runs)]
                            for key in ("turn_accuracy", "exact_match", "turn_recognition")}
        summary[variant]["seeds"] = len(runs)
    return summary


def turn_recognition_accuracy(predictions: Path) -> float:
    """Share of held-out turns whose answer's first emotion word is the turn's label."""
    records = read_predictions(predictions)
    hits = [(extract_emotions(r["prediction"]) or [None])[0] == canonical_emotion(r["reference"]) for r in records]
    return 100.0 * sum(hits) / len(hits)


def table(rows: dict[str, dict], chance: dict[str, float], n_test: int) -> str:
    lines = ["| run | trajectory: per-turn accuracy | trajectory: exact sequence | single-turn recognition "
             "| per turn, by position | language match | training time |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, r in rows.items():
        positions = " / ".join(f"{a:.0f}" for a in r["by_position"])
        lines.append(f"| {name} | {r['turn_accuracy']:.1f} % | {r['exact_match']:.1f} % "
                     f"| {r['turn_recognition']:.1f} % | {positions} % | {r['language_match']:.1f} % "
                     f"| {r['train_s'] / 60:.1f} min |")
    lines.append(f"| chance: uniform / majority label | {chance['uniform']:.1f} % / {chance['majority']:.1f} % "
                 f"| ~0 % | {chance['uniform']:.1f} % / {chance['turn_majority']:.1f} % | - | - | - |")
    return "\n".join(lines) + f"\n\n({n_test} held-out dialogues)"


def summary_table(summary: dict[str, dict]) -> str:
    """`seed_summary` as a table: mean (lowest-highest) of each score."""
    lines = ["| mode | seeds | per turn: mean (range) | exact sequence | single turn |",
             "| --- | ---: | --- | --- | --- |"]
    for variant, s in summary.items():
        cells = [f"{m:.1f} % ({lo:.1f}-{hi:.1f})" for m, lo, hi in
                 (s["turn_accuracy"], s["exact_match"], s["turn_recognition"])]
        lines.append(f"| {variant} | {s['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo_learning", help="corpus, checkpoints, predictions and the report")
    ap.add_argument("--num-dialogues", type=int, default=1200)
    ap.add_argument("--recombined", type=int, default=3000, help="recombined training dialogues to add")
    ap.add_argument("--options", action="extend", nargs="*", default=[],
                    help="extra config overrides for both runs (repeatable)")
    ap.add_argument("--compare-turn-modes", action="store_true",
                    help="instead of audio vs silenced: the audio run in turn modes (a) concat, (b) per_turn "
                         "untrimmed, (c) packed + trimmed + padding-free, (d) per_turn trimmed, for each --seeds")
    ap.add_argument("--modes", nargs="+", choices=["a", "b", "c", "d"], default=["a", "b", "c"],
                    help="with --compare-turn-modes: the modes to run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42], help="run.seed of each run")
    ap.add_argument("--at-once", type=int, default=2, help="trainings run side by side")
    ap.add_argument("--plain-answers", action="store_true",
                    help="every trajectory answer in one plain form instead of varied wording (an ablation)")
    args = ap.parse_args()
    started = time.time()
    out = ROOT / args.out
    corpus = out / "corpus"
    if not (corpus / "ann" / "test.json").is_file():
        run([sys.executable, "-m", "scripts.make_demo_corpus", "--num-dialogues", str(args.num_dialogues),
             "--tasks", "1", "--out", str(corpus), "--plain-audio",
             *(["--plain-answers"] if args.plain_answers else [])])
    ann = corpus / "ann"
    train, test = dialogues(ann / "train.json"), dialogues(ann / "test.json")
    check_held_out(train + dialogues(ann / "valid.json"), test)
    mixed = (train + sub_dialogues(train, args.plain_answers)
             + recombined_dialogues(train, args.recombined, plain_answers=args.plain_answers) + turn_samples(train))
    train_ann = write_annotation(ann / "train_mixed.json", mixed)
    test_turns = write_annotation(ann / "test_turns.json", turn_samples(test))

    variants = ({name: settings for name, settings in TURN_MODES.items() if name[-2] in args.modes}
                if args.compare_turn_modes else RUNS)
    planned = [((f"{name} seed {seed}" if len(args.seeds) > 1 else name), name, seed)
               for seed in args.seeds for name in variants]  # a seed's runs side by side
    runs = {run: [*variants[name], f"run.seed={seed}"] for run, name, seed in planned}
    variant_of = {run: name for run, name, _ in planned}
    run_dirs = {name: out / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "")
                for name in runs}
    options = {name: [f"datasets.train_ann_path={train_ann}", f"datasets.valid_ann_path={ann / 'valid.json'}",
                      f"datasets.test_ann_path={ann / 'test.json'}", *settings,
                      f"run.output_dir={run_dirs[name]}", *args.options] for name, settings in runs.items()}
    to_train = {name: [sys.executable, "train.py", "--cfg-path", CONFIG, "--options", *options[name]]
                for name in runs if finished_training_seconds(run_dirs[name]) is None}
    train_s = run_in_rounds(to_train, {name: run_dirs[name] / "train.log" for name in to_train}, args.at_once)
    train_s |= {name: finished_training_seconds(run_dirs[name]) for name in runs if name not in to_train}
    evaluations, logs = {}, {}
    for name in runs:
        ckpt = latest_checkpoint(run_dirs[name])
        for kind, ann_path in (("eval", ann / "test.json"), ("eval_turns", test_turns)):
            evaluations[(name, kind)] = [sys.executable, "evaluate.py", "--cfg-path", CONFIG, "--ann", str(ann_path),
                                         "--out-dir", str(run_dirs[name] / kind), "--options", *options[name],
                                         f"model.ckpt={ckpt}"]
            logs[(name, kind)] = run_dirs[name] / f"{kind}.log"
    run_in_rounds(evaluations, logs, 2 * args.at_once)

    rows = {name: {**score(run_dirs[name] / "eval" / "predictions.jsonl", test), "train_s": train_s[name],
                   "turn_recognition": turn_recognition_accuracy(run_dirs[name] / "eval_turns" / "predictions.jsonl")}
            for name in runs}
    chance = chance_levels(train, test)
    report = table(rows, chance, len(test))
    report += f" The whole experiment took {(time.time() - started) / 60:.1f} min on {os.cpu_count()} cores."
    summary = seed_summary(rows, variant_of) if len(args.seeds) > 1 else None
    if summary:
        report += "\n\n" + summary_table(summary)
    # one report per set of modes, so a second --compare-turn-modes call beside the first keeps both
    report_name = f"report_modes_{''.join(args.modes)}" if args.compare_turn_modes else "report"
    (out / f"{report_name}.md").write_text(report + "\n", encoding="utf-8")
    (out / f"{report_name}.json").write_text(json.dumps({"runs": rows, "seed_summary": summary, "chance": chance,
                                                         "held_out_dialogues": len(test)}, indent=1),
                                              encoding="utf-8")
    print(report)
    if args.compare_turn_modes:
        print(f"wrote {out / report_name}.md and {report_name}.json")
        return
    plot(rows, chance, out / "report.png")
    export_weights(latest_checkpoint(run_dirs["audio"]), out / "salmonn_tiny.pth")
    print(f"wrote {out / 'report.md'}, report.json, report.png and salmonn_tiny.pth (the audio run's weights: "
          "assets/tiny/salmonn_tiny.pth, which configs/demo.yaml fine-tunes from, is this file)")


def finished_training_seconds(run_dir: Path) -> float | None:
    """The training time of a run that finished in an earlier call (its log ends with train.py's "done:" line),
    from the log's first and last timestamps; None when it has not finished: a rerun trains only what is left."""
    log = run_dir / "train.log"
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    done = [line for line in lines if " INFO salmonn.train: done: " in line]
    if not done:
        return None
    def stamp(line: str) -> float:
        return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))

    return stamp(done[-1]) - stamp(lines[0])


def latest_checkpoint(run_dir: Path) -> Path:
    """The run's last step checkpoint: the weights that are evaluated (and exported)."""
    return sorted(run_dir.glob("checkpoint_step*.pth"), key=lambda p: int(p.stem.split("step")[1]))[-1]


def export_weights(checkpoint: Path, path: Path) -> None:
    """The trained tensors of a training checkpoint under the released key names, with the config they were trained
    with: what salmonn_v1.pth is to SALMONN-13B, this is to the tiny model (no optimizer state, ~2 MB)."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({"model": state["model"], "config": state["config"], "step": state["step"]}, path)


def plot(rows: dict[str, dict[str, float]], chance: dict[str, float], path: Path) -> None:
    """The table as grouped bars (audio vs silenced per score), chance as a dashed line: the README's picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = {"turn_accuracy": "trajectory,\nper turn", "exact_match": "trajectory,\nexact sequence",
              "turn_recognition": "single turn"}
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=120)
    width = 0.8 / len(rows)
    for i, (name, row) in enumerate(rows.items()):
        xs = [k + (i - (len(rows) - 1) / 2) * width for k in range(len(scores))]
        bars = ax.bar(xs, [row[key] for key in scores], width, label=name)
        ax.bar_label(bars, fmt="%.0f%%", fontsize=8)
    ax.axhline(chance["uniform"], color="grey", linestyle="--", linewidth=1, label="chance (uniform)")
    ax.set_xticks(range(len(scores)), list(scores.values()))
    ax.set_ylabel("accuracy on held-out dialogues (%)")
    ax.set_ylim(0, 100)
    ax.legend(frameon=False, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()

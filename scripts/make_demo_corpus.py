"""Builds the HumDial-shaped demo corpus (data/demo): English and Chinese dialogues of 3-5 user turns spoken by
espeak-ng, each turn's prosody (pitch, pitch range, rate, volume) following its emotion label.

    python -m scripts.make_demo_corpus                                # the committed corpus (data/demo)
    python -m scripts.make_demo_corpus --num-dialogues 2000 --out /tmp/demo_big   # a larger one at run time

It writes OUT/HD-Track1-T<n>-{train,test}.jsonl for each task, OUT/audio/ (replaced in full) and, through
convert.py, OUT/ann/{train,valid,test}.json ready for the dataset.

Needs `espeak-ng` on the PATH (apt-get install espeak-ng). Reproducible: the same arguments give the same
dialogues, labels and audio parameters (the bytes depend only on the espeak-ng build).

Design, so that the corpus can test whether a model hears emotion:
- The user's sentences contain no emotion words and labels are drawn independently of the sentence, so the
  audio is the only emotion cue (the text says nothing about the label).
- Task 1 (emotional trajectory): the last turn asks how the user's emotions changed and is neutral, as in the
  release; the target names every statement's emotion in order, in varied natural language as real answers do
  (synonyms, sometimes two words for one turn, "from X to Y", the closing neutral turn called calm or left
  unnamed: tools.demo_answers.trajectory_summary), which humdial.trajectory reads.
- Task 2 (emotional reasoning): the last turn asks why; the target ties each emotion to what the user said.
  Task 3 (empathy): statements only; the reply at the turn where the challenge evaluates it (the second one that
  is not neutral: humdial.tasks.evaluated_turn) is an empathetic one. `--tasks 1` writes Task 1 alone (the
  listening experiment).
- Transcripts carry the release's paralinguistic tags now and then ([laughter], [sigh] / [笑声], [叹息声]); the
  audio speaks the sentence without them.
- Held-out (test) dialogues use sentences of which some never appear in training dialogues.
- Audio is deliberately not 16 kHz and mixes wav/flac/ogg, mono and stereo, to exercise the loader
  (`--plain-audio`: 16 kHz mono WAV throughout, for a corpus read many times; same dialogues).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import librosa
import numpy as np
import soundfile as sf
import soxr

from models import SAMPLE_RATE
from humdial.tasks import TASKS, evaluated_turn
from metrics import EMOTIONS
from tools.demo_answers import ANSWER_WORDS, trajectory_summary

ROOT = Path(__file__).resolve().parent.parent

# espeak-ng pitch (0-99), rate (words/min), amplitude (0-200) and SSML pitch range per emotion.
PROSODY = {
    "neutral": (50, 165, 100, "medium"),
    "happy": (68, 190, 125, "high"),
    "sad": (30, 130, 60, "x-low"),
    "anger": (42, 200, 165, "high"),
    "fear": (76, 215, 80, "x-high"),
    "surprise": (84, 170, 140, "x-high"),
    "disgust": (28, 135, 115, "low"),
}
RATE_FACTOR = {"en": 1.0, "zh": 1.35}  # espeak's Mandarin is slow at English rates
VOICES = {"en": ["en-us", "en-gb"], "zh": ["cmn"]}
VARIANTS = ["m1", "m3", "f2", "f3", "f4"]
SPEAKERS_PER_LANGUAGE = 6

# (file extension, sample rate, channels): never 16 kHz; the loader must resample and downmix. Mostly
# compressed ogg so that the committed corpus stays at a few MB.
AUDIO_FORMATS = [("ogg", 22050, 1)] * 6 + [("ogg", 24000, 2)] * 2 + [("flac", 11025, 1), ("wav", 8000, 1)]
# --plain-audio: what the loader reads fastest, for corpora that are read many times (scripts/learning_experiment.py)
PLAIN_AUDIO_FORMAT = ("wav", SAMPLE_RATE, 1)
OGG_COMPRESSION = 0.8  # libsndfile's vorbis compression level (0 best quality, 1 smallest)
TRIM_TOP_DB = 40  # espeak's leading/trailing silence is trimmed to this level below the peak ...
TRIM_MARGIN_S = 0.1  # ... keeping this much of it

SENTENCES = {
    "en": [
        "I got a message from my landlord this morning.",
        "My sister is moving to another city next month.",
        "The meeting with my manager was moved to Friday.",
        "I found my old school photos in a box yesterday.",
        "The train stopped in the middle of the tunnel today.",
        "My neighbour parked his truck in front of my door again.",
        "I just opened the letter from the university.",
        "Someone left a package on my doorstep last night.",
        "My phone screen cracked when it fell on the floor.",
        "The doctor called me back about the test results.",
        "Our team has to finish the whole project by Monday.",
        "I saw my best friend from college at the station.",
        "The kitchen sink started leaking again this morning.",
        "My brother borrowed my car and returned it with a dent.",
        "They announced the new schedule at work today.",
        "I heard a strange noise outside the window last night.",
        "The restaurant served me a plate of cold noodles.",
        "My cat did not come home yesterday evening.",
        "I passed my driving test this afternoon.",
        "The bank sent me a notice about my account.",
        "My flight was changed to an earlier time.",
        "I ran into my old teacher at the supermarket.",
        "The power went out while I was cooking dinner.",
        "My roommate ate the food I saved for lunch.",
        "The interview lasted almost two hours.",
        "I got a call from a number I did not know.",
        "My parents are coming to visit this weekend.",
        "There was a long line at the post office today.",
        "My laptop shut down before I saved the file.",
        "The bus driver took a different route this morning.",
    ],
    "zh": [
        "今天早上房东给我发了条消息。",
        "我姐姐下个月要搬到别的城市。",
        "跟领导的会改到周五了。",
        "昨天我在箱子里找到了以前的照片。",
        "今天地铁在隧道里停了很久。",
        "邻居又把车停在我家门口了。",
        "我刚拆开学校寄来的信。",
        "昨晚有人在我门口放了个包裹。",
        "我的手机掉在地上，屏幕碎了。",
        "医生打电话来说检查结果出来了。",
        "我们组要在周一前做完整个项目。",
        "我在车站碰到了大学时的好朋友。",
        "厨房的水管今天早上又漏水了。",
        "我弟弟借了我的车，还回来时多了个坑。",
        "公司今天公布了新的排班表。",
        "昨天晚上窗外有奇怪的声音。",
        "餐厅给我上了一盘凉掉的面条。",
        "我家的猫昨晚没有回来。",
        "我今天下午通过了驾照考试。",
        "银行给我寄了一份账户通知。",
        "我的航班改到了更早的时间。",
        "我在超市遇到了以前的老师。",
        "我做饭的时候突然停电了。",
        "室友把我留的午饭吃掉了。",
        "今天的面试差不多有两个小时。",
        "我接到一个陌生号码的电话。",
        "我爸妈这个周末要来看我。",
        "今天邮局排了很长的队。",
        "我的电脑还没保存就关机了。",
        "今天早上公交车换了路线。",
    ],
}
HELD_OUT_SENTENCES = {  # only ever in test dialogues
    "en": [
        "I left my umbrella on the train this morning.",
        "My cousin is getting married in the spring.",
        "The landlord wants to raise the rent next year.",
        "I found a note on my desk from my coworker.",
        "The elevator in our building stopped working again.",
        "My friend sent me a video from the concert.",
        "The vet said my dog needs surgery.",
        "Somebody scratched the side of my car in the parking lot.",
    ],
    "zh": [
        "我今天把伞忘在地铁上了。",
        "我表哥春天要结婚了。",
        "房东说明年要涨房租。",
        "同事在我桌上留了张纸条。",
        "我们楼的电梯又坏了。",
        "朋友给我发了一段演唱会的视频。",
        "兽医说我的狗需要做手术。",
        "有人在停车场把我的车划了。",
    ],
}
QUESTIONS = {
    "en": ["Looking back at our conversation, how did my emotions change?",
           "Can you sum up how my emotions shifted while we talked?",
           "How would you describe the way my emotions changed from start to finish?"],
    "zh": ["回顾一下我们的对话，我的情绪是怎么变化的？",
           "你能总结一下我刚才情绪的变化吗？",
           "从开始到现在，我的情绪有什么变化？"],
}
WHY_QUESTIONS = {
    "en": ["Why do you think my mood changed while we talked?", "What made my feelings shift during our chat?"],
    "zh": ["你觉得我刚才的情绪为什么会变化？", "是什么让我的心情一直在变？"],
}
EMPATHY = {  # the reply to the evaluated turn of a Task 3 dialogue, per label; {} is a word for the emotion
    "en": {"happy": "That is wonderful news! No wonder you feel {}. Enjoy it, you deserve it.",
           "sad": "I am so sorry. It makes sense to feel {} after that; I am here if you want to talk.",
           "anger": "That sounds really unfair. Feeling {} is understandable; do you want to think about what to do?",
           "fear": "That sounds frightening. It is natural to be {}; let us take it one step at a time.",
           "surprise": "Wow, I did not see that coming either! Being {} makes total sense.",
           "disgust": "Ugh, that sounds awful. Anyone would feel {}; I hope you can put it behind you soon."},
    "zh": {"happy": "太好了！难怪你这么{}，好好享受这份喜悦吧。",
           "sad": "真的很抱歉听到这些，感到{}是很正常的，想聊聊的话我一直都在。",
           "anger": "这确实太不公平了，你{}完全可以理解，要不要一起想想怎么办？",
           "fear": "听起来真让人不安，{}是很自然的，我们一步一步来。",
           "surprise": "哇，这也太出乎意料了！你会{}一点都不奇怪。",
           "disgust": "这也太让人难受了，换谁都会{}，希望你能尽快把它抛在脑后。"},
}
TAGS = {"en": {"happy": "[laughter]", "sad": "[sigh]", "other": "[clears throat]"},
        "zh": {"happy": "[笑声]", "sad": "[叹息声]", "other": "[清嗓声]"}}
TAG_RATE = 0.3  # share of statements whose transcript carries a tag
TASK_TURNS = {1: "question", 2: "why", 3: "statements"}  # what ends a dialogue of each task
TASK_SHARE = {1: 1.0, 2: 0.25, 3: 0.25}  # dialogues per task, as a share of --num-dialogues
REPLIES = {
    "en": ["I see. What happened after that?", "Thanks for telling me. Please go on.",
           "Okay, I am listening. Tell me more.", "What did you do next?", "Got it. How did it turn out?"],
    "zh": ["我明白了，后来呢？", "谢谢你告诉我，接着说吧。", "好的，我在听，多说一点。",
           "你接下来做了什么？", "知道了，结果怎么样？"],
}


@dataclass(frozen=True)
class Speaker:
    voice: str  # espeak-ng voice with variant, e.g. "en-gb+f3"
    pitch_offset: int
    rate_factor: float


@dataclass(frozen=True)
class Turn:
    text: str  # what is spoken
    emotion: str
    reply: str
    audio_format: tuple[str, int, int]
    tag: str = ""  # a paralinguistic tag the transcript carries besides the text


class LabelCycle:
    """Emotion labels in shuffled rounds of all seven: every emotion appears, and about equally often."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.pending: list[str] = []

    def next(self) -> str:
        if not self.pending:
            self.pending = list(EMOTIONS)
            self.rng.shuffle(self.pending)
        return self.pending.pop()


def make_speakers(rng: random.Random) -> dict[str, list[Speaker]]:
    return {lang: [Speaker(f"{rng.choice(voices)}+{VARIANTS[i % len(VARIANTS)]}", rng.randint(-6, 6),
                           rng.uniform(0.92, 1.08)) for i in range(SPEAKERS_PER_LANGUAGE)]
            for lang, voices in VOICES.items()}


def plan_dialogue(rng: random.Random, labels: LabelCycle, language: str, held_out: bool, task: int) -> list[Turn]:
    """3-5 user turns; labels independent of the text. Tasks 1 and 2 end with a neutral question (how did my
    emotions change / why), Task 3 has statements only, enough of them not neutral for its evaluated turn."""
    num_turns = rng.choice([3, 4, 5])
    num_statements = num_turns if TASK_TURNS[task] == "statements" else num_turns - 1
    pool = SENTENCES[language] + (HELD_OUT_SENTENCES[language] if held_out else [])
    statements = rng.sample(pool, num_statements)
    if held_out and not any(s in HELD_OUT_SENTENCES[language] for s in statements):
        statements[rng.randrange(len(statements))] = rng.choice(HELD_OUT_SENTENCES[language])
    emotions = [labels.next() for _ in statements]
    answered = TASKS["empathy"].answered_non_neutral_turn
    while TASK_TURNS[task] == "statements" and sum(e != "neutral" for e in emotions) < answered:
        emotions[emotions.index("neutral")] = labels.next()  # Task 3 needs the turn it is evaluated at
    replies = rng.sample(REPLIES[language], num_turns)  # the evaluated turn's is replaced by the target
    turns = [Turn(text, emotion, reply, rng.choice(AUDIO_FORMATS), statement_tag(emotion, language, rng))
             for text, emotion, reply in zip(statements, emotions, replies)]
    if TASK_TURNS[task] != "statements":
        questions = QUESTIONS if TASK_TURNS[task] == "question" else WHY_QUESTIONS
        turns.append(Turn(rng.choice(questions[language]), "neutral", replies[-1], rng.choice(AUDIO_FORMATS)))
    return turns


def statement_tag(emotion: str, language: str, rng: random.Random) -> str:
    """Now and then the paralinguistic tag a real transcript would carry for the turn ([laughter], [叹息声])."""
    if rng.random() >= TAG_RATE:
        return ""
    tags = TAGS[language]
    return tags.get(emotion, tags["other"])


def target(task: int, turns: list[Turn], language: str, rng: random.Random, plain_answers: bool = False
           ) -> tuple[int, str]:
    """(index of the evaluated turn, the reply written there): the trajectory (Task 1), the reasons (Task 2), or
    an empathetic reply at the turn where the challenge evaluates Task 3 (humdial.tasks.evaluated_turn)."""
    emotions = [t.emotion for t in turns]
    if task == 1:
        return len(turns) - 1, trajectory_summary(emotions, language, None if plain_answers else rng)
    if task == 2:
        return len(turns) - 1, reasons(turns[:-1], language, rng)
    index, _ = evaluated_turn([{"emotion": e} for e in emotions], "empathy")
    word = rng.choice(ANSWER_WORDS[language][emotions[index]])
    return index, EMPATHY[language][emotions[index]].format(word)


def reasons(statements: list[Turn], language: str, rng: random.Random) -> str:
    """Task 2's answer: each statement's emotion tied to what the user said ("When your ..., you felt ...")."""
    words = ANSWER_WORDS[language]
    if language == "zh":
        parts = [f"{'先是' if i == 0 else '后来'}因为{second_person(t.text, language)}，"
                 f"你感到{rng.choice(words[t.emotion])}" for i, t in enumerate(statements)]
        return "，".join(parts) + "。"
    parts = [f"{'First' if i == 0 else 'then'}, when {second_person(t.text, language)}, you felt "
             f"{rng.choice(words[t.emotion])}" for i, t in enumerate(statements)]
    return "; ".join(parts) + "."


def second_person(sentence: str, language: str) -> str:
    """The user's sentence said back to them: I/my/me -> you/your (我 -> 你), final punctuation dropped."""
    sentence = sentence.rstrip("。.!！?？")
    if language == "zh":
        return sentence.replace("我", "你")
    swaps = {"I": "you", "my": "your", "My": "your", "me": "you", "I'm": "you're"}
    words = [swaps.get(w, w) for w in sentence.split()]
    return " ".join([words[0][0].lower() + words[0][1:] if words[0] not in ("you", "your") else words[0], *words[1:]])


@dataclass(frozen=True)
class Voice:
    """espeak-ng settings of one turn: the speaker's voice with the emotion's prosody and a little jitter."""
    voice: str
    pitch: int
    rate: int
    amplitude: int
    pitch_range: str


def turn_voice(speaker: Speaker, emotion: str, language: str, rng: random.Random) -> Voice:
    """Draws the turn's jitter from the corpus rng (in the main loop, so the corpus does not depend on threads)."""
    pitch, rate, amplitude, pitch_range = PROSODY[emotion]
    pitch = min(99, max(0, pitch + speaker.pitch_offset + rng.randint(-3, 3)))
    rate = round(rate * speaker.rate_factor * RATE_FACTOR[language] * rng.uniform(0.96, 1.04))
    return Voice(speaker.voice, pitch, rate, amplitude, pitch_range)


def espeak(text: str, voice: Voice) -> tuple[np.ndarray, int]:
    """espeak-ng speech of the text in the turn's voice."""
    ssml = f'<speak><prosody range="{voice.pitch_range}">{escape(text)}</prosody></speak>'
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-m", "-v", voice.voice, "-p", str(voice.pitch), "-s", str(voice.rate),
                        "-a", str(voice.amplitude), "-w", str(out), ssml], check=True, capture_output=True)
        wav, rate_hz = sf.read(str(out), dtype="float32")
    return wav, rate_hz


def trim_silence(wav: np.ndarray, rate: int) -> np.ndarray:
    """Drops espeak's leading and trailing silence but a short margin: smaller files, same speech."""
    _, (start, end) = librosa.effects.trim(wav, top_db=TRIM_TOP_DB)
    margin = round(TRIM_MARGIN_S * rate)
    return wav[max(0, start - margin):end + margin]


def write_audio(path: Path, wav: np.ndarray, rate: int, audio_format: tuple[str, int, int]) -> None:
    """Resamples to the format's rate; a stereo file gets a quieter copy in the right channel."""
    extension, target_rate, channels = audio_format
    if target_rate != rate:
        wav = soxr.resample(wav, rate, target_rate)
    if channels == 2:
        wav = np.stack([wav, 0.7 * wav], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"compression_level": OGG_COMPRESSION} if extension == "ogg" else {}
    sf.write(str(path), np.clip(wav, -1.0, 1.0), target_rate, **options)


def synthesize(path: Path, text: str, voice: Voice, audio_format: tuple[str, int, int]) -> None:
    wav, rate = espeak(text, voice)
    write_audio(path, trim_silence(wav, rate), rate, audio_format)


def build(out: Path, num_dialogues: int, test_fraction: float, seed: int, workers: int,
          plain_audio: bool = False, tasks: tuple[int, ...] = (1, 2, 3), plain_answers: bool = False) -> None:
    """Plans every dialogue in order with one rng, then synthesizes the turns on `workers` threads (espeak-ng
    runs as a subprocess, so threads overlap): the same arguments give the same corpus for any `workers`.
    `num_dialogues` Task 1 dialogues, and TASK_SHARE of that many for each other task in `tasks`.
    `plain_answers`: Task 1 answers in the one plain form (tools.demo_answers.trajectory_summary without rng)."""
    rng = random.Random(seed)
    shutil.rmtree(out / "audio", ignore_errors=True)  # regenerated in full: no stale files of older runs
    speakers = make_speakers(rng)
    lines: dict[tuple[int, str], list[str]] = {}
    index = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        jobs = []
        for task in tasks:
            count = max(2, round(num_dialogues * TASK_SHARE[task]))  # at least one training and one test dialogue
            num_test = min(count - 1, max(1, round(count * test_fraction)))
            labels = {"train": LabelCycle(random.Random(seed + 10 * task + 1)),
                      "test": LabelCycle(random.Random(seed + 10 * task + 2))}
            for k in range(count):
                split = "test" if k >= count - num_test else "train"
                language = ("en", "zh")[index % 2]
                speaker_index = rng.randrange(SPEAKERS_PER_LANGUAGE)
                speaker = speakers[language][speaker_index]
                dialogue_id = f"{language}_{speaker_index + 1:04d}_{index + 1:04d}"
                index += 1
                turns = plan_dialogue(rng, labels[split], language, held_out=split == "test", task=task)
                evaluated, reply = target(task, turns, language, rng, plain_answers)
                record_turns = []
                for n, turn in enumerate(turns, start=1):
                    audio_format = PLAIN_AUDIO_FORMAT if plain_audio else turn.audio_format
                    relative = f"audio/task{task}_{len(turns)}/{dialogue_id}_{n}.{audio_format[0]}"
                    voice = turn_voice(speaker, turn.emotion, language, rng)
                    jobs.append(pool.submit(synthesize, out / relative, turn.text, voice, audio_format))
                    text = f"{turn.tag} {turn.text}" if turn.tag and language == "en" else f"{turn.tag}{turn.text}"
                    record_turns.append({"turn_id": n, "text": text, "emotion": turn.emotion,
                                         "split_audio_file": relative,
                                         "response_text": reply if n - 1 == evaluated else turn.reply})
                lines.setdefault((task, split), []).append(
                    json.dumps({"dialogue_id": dialogue_id, "turns": record_turns}, ensure_ascii=False))
        for job in jobs:
            job.result()  # re-raises the first failed synthesis
    for (task, split), split_lines in lines.items():
        (out / f"HD-Track1-T{task}-{split}.jsonl").write_text("\n".join(split_lines) + "\n", encoding="utf-8")
    out = Path(os.path.relpath(out))  # the annotations' "source" fields and reports stay free of local paths
    convert = [sys.executable, str(ROOT / "convert.py")]
    subprocess.run([*convert, *(str(out / f"HD-Track1-T{t}-train.jsonl") for t in tasks), "-o", str(out / "ann"),
                    "--valid-ratio", "0.15", "--seed", str(seed), "--replace"], check=True)  # a corpus made again
    subprocess.run([*convert, *(str(out / f"HD-Track1-T{t}-test.jsonl") for t in tasks), "-o", str(out / "ann"),
                    "--name", "test", "--replace"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "demo")
    parser.add_argument("--num-dialogues", type=int, default=40)
    parser.add_argument("--test-fraction", type=float, default=0.2, help="share of held-out test dialogues")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="threads synthesizing turns (the corpus is the same for any number)")
    parser.add_argument("--plain-audio", action="store_true",
                        help="every turn as 16 kHz mono WAV (fast to read) instead of mixed rates, channels and "
                             "containers (which exercise the loader); the dialogues are the same")
    parser.add_argument("--tasks", default="1,2,3", help="HumDial Track 1 tasks to write, e.g. 1 or 1,2,3")
    parser.add_argument("--plain-answers", action="store_true",
                        help="Task 1 answers in one plain form instead of varied wording (an ablation)")
    args = parser.parse_args()
    tasks = tuple(int(t) for t in args.tasks.split(","))
    if not set(tasks) <= set(TASK_TURNS):
        parser.error(f"--tasks takes numbers from {sorted(TASK_TURNS)}, got {args.tasks!r}")
    build(args.out, args.num_dialogues, args.test_fraction, args.seed, args.workers, args.plain_audio, tasks,
          args.plain_answers)
    print(f"wrote the dialogues of task(s) {args.tasks} to {args.out} (annotations in {args.out / 'ann'})")


if __name__ == "__main__":
    main()

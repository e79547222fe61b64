"""Scores for SALMONN answers: WER, CER, BLEU, ROUGE-L, the caption metrics (CIDEr-D, METEOR, SPICE, SPIDEr),
label accuracy, emotion-trajectory accuracy and language match.

Conventions (the README repeats them):
- Every score is a percentage in [0, 100] (WER and CER can exceed 100 when the answer has many insertions;
  CIDEr-D and SPIDEr, x100 like the rest, range to 1000).
- Captioning (CAPTION_TASKS, English): the COCO caption toolkit (pycocoevalcap) as the AAC challenges run it,
  PTB-tokenised, CIDEr-D over the set's references. A metric that cannot run (no Java, SPICE's CoreNLP jars
  missing, Chinese, a single caption) is reported unavailable with the reason (`unavailable_scores`).
- Accuracy (ACCURACY_TASKS): % of answers giving the reference's label: the first emotion named (single-clip
  emotion recognition), the first yes/no (speaker verification), the reference's words (closed-form QA).
- WER and CER are corpus-level: total edits / total reference tokens, via jiwer.
- English text goes through openai-whisper's `EnglishTextNormalizer`; Chinese and other text through its
  `BasicTextNormalizer` (lower case, punctuation and symbols removed), then whitespace is dropped for CER.
- BLEU is sacrebleu's corpus BLEU (tokenizer `13a` for English, `zh` for Chinese).
- ROUGE-L is the mean over pairs of the LCS F1 (beta = 1); Chinese is compared character by character,
  English word by word.
- Emotion trajectory: an answer is read as slots, one per clause that names emotions (`emotion_slots`); slot i
  goes with gold turn i (`aligned_emotions`), and a turn is right when its label is among its slot's emotions.
  A final neutral turn (HumDial's closing question) is not scored (`scored_turns`). Negated words name nothing.
  `python -m scripts.measure_trajectory_metric <task1_3.jsonl>` checks the metric on real release text.
- Language match: % of answers written in their dialogue's language (`written_language`); it needs no
  reference, so blind test sets get it too.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jiwer
import sacrebleu
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from labels import CJK_RANGES, EMOTIONS, canonical_emotion, is_chinese, text_language, written_language

_english_normalizer = EnglishTextNormalizer()
_basic_normalizer = BasicTextNormalizer()


def normalize(text: str, language: str) -> str:
    """Whisper's English normaliser for 'en', its basic (punctuation-stripping) one for anything else."""
    if language == "en":
        return _english_normalizer(text)
    return _basic_normalizer(text).strip()


def _check_pairs(references: list[str], hypotheses: list[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no references to score")


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate (%) of English text after Whisper's English normalisation."""
    _check_pairs(references, hypotheses)
    refs = [normalize(r, "en") for r in references]
    hyps = [normalize(h, "en") for h in hypotheses]
    if not any(r.split() for r in refs):
        raise ValueError("WER is undefined: every reference is empty after normalisation")
    return 100.0 * jiwer.process_words(refs, hyps).wer


def cer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus character error rate (%) for Chinese: punctuation and all whitespace removed first."""
    _check_pairs(references, hypotheses)
    refs = [re.sub(r"\s+", "", normalize(r, "zh")) for r in references]
    hyps = [re.sub(r"\s+", "", normalize(h, "zh")) for h in hypotheses]
    if not any(refs):
        raise ValueError("CER is undefined: every reference is empty after normalisation")
    return 100.0 * jiwer.process_characters(refs, hyps).cer


def bleu(references: list[str], hypotheses: list[str], language: str = "en") -> float:
    """sacrebleu corpus BLEU (0-100), one reference per hypothesis; 'zh' uses sacrebleu's Chinese tokenizer."""
    _check_pairs(references, hypotheses)
    tokenize = "zh" if language == "zh" else "13a"
    return sacrebleu.corpus_bleu(hypotheses, [references], tokenize=tokenize).score


def rouge_tokens(text: str, language: str) -> list[str]:
    """Normalised tokens: each CJK character is a token, any other run of non-space characters is a word."""
    return re.findall(f"[{CJK_RANGES}]|[^\\s{CJK_RANGES}]+", normalize(text, language))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme, one row kept)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_pair(reference: list[str], hypothesis: list[str]) -> float:
    """ROUGE-L F1 (beta = 1) of two token lists, in [0, 1]; 0 when either is empty."""
    lcs = lcs_length(reference, hypothesis)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


def rouge_l(references: list[str], hypotheses: list[str], language: str = "en") -> float:
    """Mean ROUGE-L F1 (%) over pairs; character-level for Chinese, word-level for English."""
    _check_pairs(references, hypotheses)
    scores = [rouge_l_pair(rouge_tokens(r, language), rouge_tokens(h, language))
              for r, h in zip(references, hypotheses)]
    return 100.0 * sum(scores) / len(scores)


# --------------------------------------------------------------------------------------- emotion trajectory
# Words that name an emotion, by label, in both languages: each label's synonym family. A word listed under two
# labels names both (惊喜 is a pleasant surprise: surprise and happy). At one position the longest entry wins, so
# "不开心" is sad rather than happy; English entries match whole words only, so "sadist" names nothing.
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "happiness", "happily", "joy", "joyful", "joyous", "glad", "cheerful", "delight",
              "delighted", "excited", "excitement", "thrilled", "elated", "elation", "ecstatic", "overjoyed",
              "pleased", "jubilant", "relieved", "relief",
              "开心", "高兴", "快乐", "愉快", "愉悦", "喜悦", "欢喜", "欢乐", "欣喜", "欢欣鼓舞", "兴奋", "振奋",
              "激动", "雀跃", "狂喜", "幸福", "满足", "欣慰", "宽慰", "释然", "期待", "惊喜"),
    "sad": ("sad", "sadness", "sadly", "unhappy", "sorrow", "sorrowful", "grief", "grieving", "upset",
            "depressed", "heartbroken", "disappointed", "disappointment", "dejected", "miserable", "gloomy",
            "melancholy", "nostalgic", "nostalgia",
            "难过", "伤心", "悲伤", "悲痛", "悲哀", "哀伤", "忧伤", "伤感", "感伤", "沮丧", "失落", "失望", "低落",
            "心碎", "痛苦", "遗憾", "委屈", "心疼", "同情", "怀念", "思念", "不舍", "无奈", "挫败", "郁闷",
            "不开心", "不高兴", "不快", "不愉快"),
    "anger": ("anger", "angry", "angrily", "furious", "fury", "rage", "enraged", "outraged", "outrage", "livid",
              "irate", "mad", "annoyed", "annoyance", "irritated", "irritation", "frustrated", "frustration",
              "resentful", "resentment", "indignant", "indignation", "infuriated",
              "生气", "愤怒", "恼火", "恼怒", "气愤", "愤慨", "愤恨", "发火", "激怒", "暴怒", "怒火", "火大", "烦躁",
              "不满", "窝火", "抓狂"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "terrified", "terror", "anxious", "anxiety",
             "nervous", "nervousness", "worried", "worry", "dread", "panic", "panicked", "uneasy", "unease",
             "apprehensive", "alarmed", "tense",
             "害怕", "恐惧", "惊恐", "恐慌", "惊慌", "慌张", "担心", "担忧", "紧张", "焦虑", "不安", "忐忑", "畏惧",
             "惶恐", "惊吓", "后怕", "心慌"),
    "neutral": ("neutral", "calm", "calmly", "calmer", "composed", "relaxed", "at ease", "peaceful", "serene",
                "steady",
                "平静", "平和", "平稳", "冷静", "淡定", "从容", "坦然", "放松", "轻松", "安心", "中性", "中立"),
    "surprise": ("surprise", "surprised", "surprising", "astonished", "astonishment", "amazed", "amazement",
                 "shocked", "shock", "stunned", "startled", "astounded", "curious", "curiosity", "confused",
                 "puzzled", "bewildered", "disbelief",
                 "惊讶", "吃惊", "惊奇", "震惊", "诧异", "惊愕", "意想不到", "难以置信", "好奇", "困惑", "惊喜"),
    "disgust": ("disgust", "disgusted", "disgusting", "revolted", "revulsion", "repulsed", "repulsion", "repelled",
                "gross", "grossed out", "sickened", "nauseated", "loathing",
                "厌恶", "恶心", "反感", "嫌弃", "讨厌", "反胃", "作呕", "憎恶", "嫌恶", "厌烦"),
}

# A negator just before an emotion word cancels it ("not happy", "no longer angry", "wasn't at all scared",
# "不再生气", "没有感到害怕", "别担心"). English allows two words in between; Chinese a run of adverbs and verbs.
# 别 negates only as an imperative (opening a clause, or after 你/您/请), not as the end of 特别, 告别 ...
# Words that are negated forms themselves (不开心, 不安, unhappy) are entries of EMOTION_WORDS and stay.
_NEGATION_BEFORE_RE = re.compile(
    r"(?:\b(?:not|never|no|nor|without|hardly|cannot)|n['’]t)(?:\s+\w+){0,2}\s+$"
    f"|(?:不|没|未|毫无|(?:(?<=[你您请])|(?<![{CJK_RANGES}]))别)(?:再|有|了|太|很|那么|怎么|是|会|用|必|曾|感到|觉得)*$",
    re.IGNORECASE)

# Where the description of one turn ends and the next begins: punctuation (、 included: a list of emotions is
# read as a list of turns) and the connectives of "from X to Y", "first ..., then ..., finally ..." in both
# languages. 到 ends a turn unless it completes a verb (感到, 收到, 看到, 想不到 ...); 再 unless it is 不再.
# "and", 和, 与, 而, 又 join words of one turn ("surprise and excitement", 兴奋好奇, 因惊喜而兴奋, 又惊又喜).
_TURN_BOUNDARY_RE = re.compile(
    r"[，,。.！!？?；;：:、…—\n]"
    r"|(?<![感受收看听见找遇得想识意说提抢回来达碰拿学踩做不])到|(?<!不)再"
    r"|转为|转向|转变|转到|转而|转成|变成|变为|变得|然后|接着|随后|后来|之后|最后|最终|继而|现在|如今"
    r"|但是|但|却|不过|可是"
    r"|\b(?:to|into|then|later|afterwards|finally|eventually|ultimately|in the end|but|until|now|became|turned)\b",
    re.IGNORECASE)


def _word_regex(word: str) -> str:
    """A lexicon entry as a regex: Chinese as is, English as whole words with any spacing."""
    if is_chinese(word):
        return re.escape(word)
    return r"\b" + r"\s+".join(re.escape(part) for part in word.split()) + r"\b"


_EMOTION_RE = re.compile("|".join(_word_regex(w) for w in sorted(
    {w for words in EMOTION_WORDS.values() for w in words}, key=len, reverse=True)), re.IGNORECASE)
# Entry -> the labels it names, in EMOTIONS order.
_WORD_EMOTIONS = {word.lower(): tuple(label for label in EMOTIONS if word in EMOTION_WORDS[label])
                  for words in EMOTION_WORDS.values() for word in words}


def _emotion_mentions(answer: str) -> list[tuple[int, tuple[str, ...]]]:
    """(position, labels) of each emotion word the answer asserts, in order; negated words are left out."""
    mentions = []
    for match in _EMOTION_RE.finditer(answer):
        if not _NEGATION_BEFORE_RE.search(answer[max(0, match.start() - 40):match.start()]):
            mentions.append((match.start(), _WORD_EMOTIONS[re.sub(r"\s+", " ", match.group(0).lower())]))
    return mentions


def extract_emotions(answer: str) -> list[str]:
    """The emotions an answer names, in order of appearance, one entry per word (two for a word naming two).

    Repeats are kept, never collapsed: "sad at first, still sad, then happy" is [sad, sad, happy]. Negated words
    ("not happy", "不再生气") name nothing. Which words go with which turn is `emotion_slots`' business.
    """
    return [label for _, labels in _emotion_mentions(answer) for label in labels]


def emotion_slots(answer: str) -> list[tuple[str, ...]]:
    """The emotions the answer gives each stage of the trajectory, in order: one slot per clause that names any.

    A clause runs between two turn boundaries (punctuation, or a connective such as 到, 然后, 最后, "to",
    "then"). Words in one clause describe one turn, so "先是欣喜又好奇，后来震惊而且厌恶" gives two slots,
    (happy, surprise) and (surprise, disgust); each slot lists its labels in order of mention.
    """
    boundaries = [m.start() for m in _TURN_BOUNDARY_RE.finditer(answer)]
    slots: dict[int, list[str]] = {}
    for position, labels in _emotion_mentions(answer):
        slot = slots.setdefault(bisect.bisect_right(boundaries, position), [])
        slot.extend(label for label in labels if label not in slot)
    return [tuple(slot) for slot in slots.values()]


def aligned_emotions(answer: str, num_turns: int) -> list[tuple[str, ...]]:
    """Per gold turn, the emotions the answer gives it: the i-th slot of `emotion_slots` goes with turn i.

    Returns `num_turns` tuples of labels (JSON-ready as lists of strings); () for a turn the answer leaves
    unnamed. Slots beyond `num_turns` are ignored: answers often retell the trajectory a second time.
    """
    slots = emotion_slots(answer)[:num_turns]
    return slots + [()] * (num_turns - len(slots))


def scored_turns(gold: list[str]) -> list[str]:
    """The gold labels a trajectory is scored on: all of them but a final neutral turn after others.

    In HumDial the final turn is the user's question about the conversation, labelled neutral by construction.
    It is left out because it says nothing about whether the answer followed the dialogue: counted right when
    named calm, it gives every "..., finally calm" template a free third of the score (a fixed answer then beats
    45 % on the real release); counted right when unnamed too, it rewards answers that name nothing; and the
    reference answers themselves treat it loosely (calm, unnamed, or a relieved or positive closing state).
    """
    return gold[:-1] if len(gold) > 1 and gold[-1] == "neutral" else gold


def turn_hits(gold: list[str], answer: str) -> list[bool]:
    """Per scored gold turn, in order: whether the answer's slot for it names its label."""
    expected = scored_turns([canonical_emotion(label) for label in gold])
    return [label in slot for label, slot in zip(expected, aligned_emotions(answer, len(expected)))]


@dataclass(frozen=True)
class TrajectoryScores:
    exact_match: float      # % of samples whose every scored turn is right
    turn_accuracy: float    # % of scored turns that are right (micro-average over turns)
    num_samples: int
    num_turns: int          # scored turns: a final neutral question turn is not counted (see scored_turns)


def emotion_trajectory_scores(gold: list[list[str]], answers: list[str]) -> TrajectoryScores:
    """How well each answer describes its gold per-turn emotion trajectory.

    Turn i is right when its gold label is among the emotions of the answer's i-th slot (`aligned_emotions`), so
    "兴奋好奇" for a surprised turn is right, and an unnamed turn is wrong. The final neutral question turn is not
    scored (`scored_turns`). Extra slots beyond the gold turns are ignored, by the exact match too.
    """
    _check_pairs(gold, answers)
    exact, correct, turns = 0, 0, 0
    for labels, answer in zip(gold, answers):
        hits = turn_hits(labels, answer)
        exact += all(hits)
        correct += sum(hits)
        turns += len(hits)
    if turns == 0:
        raise ValueError("no gold emotion labels to score")
    return TrajectoryScores(exact_match=100.0 * exact / len(gold), turn_accuracy=100.0 * correct / turns,
                            num_samples=len(gold), num_turns=turns)


# ------------------------------------------------------------------------------------------------- language
def language_match(answers: list[str], languages: list[str]) -> float:
    """% of answers written in their dialogue's language ('zh' or 'en'); an empty answer matches neither."""
    if len(answers) != len(languages):
        raise ValueError(f"{len(answers)} answers but {len(languages)} languages")
    if not answers:
        raise ValueError("no answers to score")
    unknown = set(languages) - {"zh", "en"}
    if unknown:
        raise ValueError(f"unknown languages {sorted(unknown)}; expected 'zh' or 'en'")
    return 100.0 * sum(written_language(a) == lang for a, lang in zip(answers, languages)) / len(answers)


# ------------------------------------------------------------------------------------------------- captioning
# Captioning tasks (the original's prompt names; Nota's AAC set is audiocaption_v2) get the COCO caption toolkit's
# metrics as the AAC challenges, the SALMONN paper and Nota's evaluator report them.
CAPTION_TASKS = ("audiocaption", "audiocaption_v2", "music_description")
CAPTION_METRICS = ("cider_d", "meteor", "spice", "spider")
SPICE_CORENLP = "stanford-corenlp-3.6.0"  # SPICE's parser: the toolkit's package lacks it (fetched from Stanford)


def _toolkit() -> Path | None:
    """Where pycocoevalcap (the COCO caption toolkit, with its PTB tokenizer, METEOR and SPICE jars) is installed."""
    spec = importlib.util.find_spec("pycocoevalcap")  # a namespace package: no __init__.py, so no origin
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


@functools.lru_cache(maxsize=1)
def caption_machine_gaps() -> dict[str, str]:
    """The caption metrics this machine cannot compute, each with what to install where ({} when it can all)."""
    toolkit = _toolkit()
    if toolkit is None:
        return dict.fromkeys(CAPTION_METRICS, "pycocoevalcap is not installed (pip install -r requirements.txt)")
    if shutil.which("java") is None:
        return dict.fromkeys(CAPTION_METRICS, "needs Java for the PTB tokenizer, METEOR and SPICE: apt-get install "
                                              "default-jre-headless")
    lib = toolkit / "spice" / "lib"
    if not all((lib / f"{SPICE_CORENLP}{suffix}.jar").is_file() for suffix in ("", "-models")):
        reason = (f"SPICE needs Stanford CoreNLP 3.6.0, which no package registry ships: put {SPICE_CORENLP}.jar "
                  f"and {SPICE_CORENLP}-models.jar (from stanford-corenlp-full-2015-12-09.zip) in {lib}")
        return {"spice": reason, "spider": reason}
    return {}


def caption_gaps(task: str, language: str, num_captions: int) -> dict[str, str]:
    """The caption metrics a (task, language) group of `num_captions` scored captions does not get, and why."""
    if task not in CAPTION_TASKS:
        return {}
    if language == "zh":
        return dict.fromkeys(CAPTION_METRICS, "English only (the PTB tokenizer, METEOR and SPICE's parser)")
    gaps = dict(caption_machine_gaps())
    if num_captions < 2:
        reason = "CIDEr-D needs at least 2 captions (its n-gram weights come from the set's references)"
        gaps.update(cider_d=reason, spider=gaps.get("spider", reason))
    return gaps


def caption_scores(references: list[str] | list[list[str]], hypotheses: list[str],
                   metrics: Iterable[str] = CAPTION_METRICS) -> dict[str, float]:
    """CIDEr-D, METEOR, SPICE and SPIDEr (the mean of CIDEr-D and SPICE), x100, as the COCO caption toolkit
    computes them: captions PTB-tokenised (lower case, punctuation dropped), CIDEr-D's n-gram weights from this
    set's references (sigma 6, clipped counts), METEOR 1.5 with English paraphrases. Each caption has one
    reference or a list of them. `metrics`: which to compute (caption_gaps says which can run here)."""
    _check_pairs(references, hypotheses)
    metrics = set(metrics)
    unknown = metrics - set(CAPTION_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metric(s) {sorted(unknown)}; known: {', '.join(CAPTION_METRICS)}")
    from pycocoevalcap.cider.cider import Cider  # imported here: a Java-backed toolkit, for caption tasks only
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    tokenizer = PTBTokenizer()
    refs = tokenizer.tokenize({i: [{"caption": r} for r in ([rs] if isinstance(rs, str) else rs)]
                               for i, rs in enumerate(references)})
    hyps = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    scores: dict[str, float] = {}
    if metrics & {"cider_d", "spider"}:
        scores["cider_d"] = 100.0 * float(Cider().compute_score(refs, hyps)[0])
    if "meteor" in metrics:
        from pycocoevalcap.meteor.meteor import Meteor
        scores["meteor"] = 100.0 * Meteor().compute_score(refs, hyps)[0]  # its Java process ends with the object
    if metrics & {"spice", "spider"}:
        from pycocoevalcap.spice.spice import Spice
        scores["spice"] = 100.0 * float(Spice().compute_score(refs, hyps)[0])
    if "spider" in metrics:
        scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
    return {name: value for name, value in scores.items() if name in metrics}


# --------------------------------------------------------------------------------------------------- accuracy
# Tasks whose answer is one label: the share of answers naming the reference's label (%). Single-clip emotion
# recognition reads the first emotion an answer names (EMOTION_WORDS, negation-aware), speaker verification the
# first yes or no, closed-form QA (every reference at most CLOSED_FORM_WORDS words) the reference's words.
ACCURACY_TASKS = ("emotion_recognition", "speaker_verification", "QA")
CLOSED_FORM_WORDS = 3
_YES_NO_RE = re.compile(r"\b(yes|yeah|yep|no|nope)\b|(不是|不对|不|否|没有)|(是|对)", re.IGNORECASE)


def first_emotion(text: str) -> tuple[str, ...]:
    """The labels of the first emotion word a text asserts (two for a word that names two), () for none."""
    mentions = _emotion_mentions(text)
    return mentions[0][1] if mentions else ()


def yes_or_no(text: str) -> str | None:
    """'yes' or 'no': the first yes/no word of an answer (是/对 and 不是/不/否/没有 in Chinese), None for neither."""
    match = _YES_NO_RE.search(text)
    if match is None:
        return None
    return "yes" if match.group(3) or (match.group(1) or "").lower() in ("yes", "yeah", "yep") else "no"


def is_closed_form(reference: str, language: str) -> bool:
    """A reference of at most CLOSED_FORM_WORDS words (characters for Chinese) after normalisation."""
    return 0 < len(rouge_tokens(reference, language)) <= CLOSED_FORM_WORDS


def label_hit(task: str, reference: str, prediction: str, language: str) -> bool:
    """Whether an answer gives the reference's label (ValueError when the reference has none to give)."""
    if task == "emotion_recognition":
        gold = first_emotion(reference)
        if not gold:
            raise ValueError(f"emotion_recognition: the reference {reference!r} names none of the emotions "
                             f"({', '.join(EMOTIONS)}, or a word for one)")
        return gold[0] in first_emotion(prediction)
    gold_yes_no = yes_or_no(reference) if task == "speaker_verification" or reference.strip().lower().rstrip(
        ".!") in ("yes", "no") else None
    if task == "speaker_verification" and gold_yes_no is None:
        raise ValueError(f"speaker_verification: the reference {reference!r} is neither yes nor no")
    if gold_yes_no is not None:
        return yes_or_no(prediction) == gold_yes_no
    gold, answer = rouge_tokens(reference, language), rouge_tokens(prediction, language)
    return any(answer[i:i + len(gold)] == gold for i in range(len(answer) - len(gold) + 1))


def accuracy_gap(task: str, references: list[str]) -> str | None:
    """Why a one-label task's group gets no accuracy: references that give no label (None when all do). Reported
    with the scores rather than raised, so that a validation during training goes on."""
    if task == "emotion_recognition":
        bad, what = [r for r in references if not first_emotion(r)], "names none of the emotions"
    elif task == "speaker_verification":
        bad, what = [r for r in references if yes_or_no(r) is None], "is neither yes nor no"
    else:
        return None
    if not bad:
        return None
    return f"{len(bad)} of {len(references)} references give no label (e.g. {bad[0]!r} {what}): label every sample"


def label_accuracy(task: str, references: list[str], hypotheses: list[str], language: str) -> float | None:
    """% of answers that give their reference's label (label_hit); None for QA whose references are not all
    closed-form (open answers get BLEU and ROUGE-L only)."""
    _check_pairs(references, hypotheses)
    if task == "QA" and not all(is_closed_form(r, language) for r in references):
        return None
    hits = [label_hit(task, r, h, language) for r, h in zip(references, hypotheses)]
    return 100.0 * sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- decoded records
TRAJECTORY_TASKS = ("emotional_trajectory",)


def record_language(record: dict[str, Any]) -> str:
    """The record's language, or the language its reference is written in."""
    return record.get("language") or text_language(record["reference"])


def reference_scores(task: str, language: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """WER (English) or CER (Chinese) for `asr*` tasks, BLEU and ROUGE-L for the others, with the caption metrics
    for captioning and accuracy for one-label tasks; none when no record has a reference (a blind test set)."""
    refs = [r["reference"] for r in records]
    hyps = [r["prediction"] for r in records]
    if not any(ref.strip() for ref in refs):
        return {}
    if task.startswith("asr"):
        return {"cer": cer(refs, hyps)} if language == "zh" else {"wer": wer(refs, hyps)}
    scores = {"bleu": bleu(refs, hyps, language), "rouge_l": rouge_l(refs, hyps, language)}
    gaps = metric_gaps(task, language, refs)
    captioning = set(CAPTION_METRICS) - set(gaps) if task in CAPTION_TASKS else ()
    if captioning:
        scores.update(caption_scores(refs, hyps, captioning))
    accuracy = label_accuracy(task, refs, hyps, language) if task in ACCURACY_TASKS and "accuracy" not in gaps else None
    if accuracy is not None:
        scores["accuracy"] = accuracy
    return scores


def metric_gaps(task: str, language: str, references: list[str]) -> dict[str, str]:
    """The metrics a (task, language) group with these references should get but cannot, each with why."""
    gaps = caption_gaps(task, language, len(references))
    reason = accuracy_gap(task, references)
    return {**gaps, "accuracy": reason} if reason else gaps


def gold_trajectories(task: str, records: list[dict[str, Any]]) -> list[list[str]] | None:
    """Every record's per-turn gold labels; None when no turn has one (a blind test set), ValueError when only
    some do (a half-labelled set would be scored on the wrong turns)."""
    if not any(label for r in records for label in r.get("emotions") or []):
        return None
    if not all(r.get("emotions") and all(r["emotions"]) for r in records):
        raise ValueError(f"task {task}: some records lack gold per-turn emotion labels; label every turn")
    return [r["emotions"] for r in records]


def score_group(task: str, language: str, records: list[dict[str, Any]]) -> dict[str, float]:
    """The metrics that fit one task in one language. language_match needs no reference, so a blind test set
    gets it too; the text metrics need references and the trajectory scores need gold per-turn labels."""
    hyps = [r["prediction"] for r in records]
    scores = reference_scores(task, language, records)
    gold = gold_trajectories(task, records) if task in TRAJECTORY_TASKS else None
    if gold is not None:
        trajectory = emotion_trajectory_scores(gold, hyps)
        scores.update(emotion_exact=trajectory.exact_match, emotion_turn_acc=trajectory.turn_accuracy)
    scores["language_match"] = language_match(hyps, [language] * len(hyps))
    return scores


def group_records(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by (task, language), sorted."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["task"], record_language(record)].append(record)
    return dict(sorted(groups.items()))


def score_records(records: list[dict[str, Any]]) -> dict[str, float]:
    """Flat `{task}/{language}/{metric}` -> score (%) of decoded records ({task, prediction, reference,
    language?, emotions?}); the language is read from the reference when absent."""
    return {f"{task}/{language}/{name}": value
            for (task, language), group in group_records(records).items()
            for name, value in score_group(task, language, group).items()}


def unavailable_scores(records: list[dict[str, Any]]) -> dict[str, str]:
    """`{task}/{language}/{metric}` -> why, for the metrics that score_records could not compute (caption metrics
    on this machine, in this language, for this few captions; accuracy over unlabelled references): reported with
    the reason, never as a number."""
    return {f"{task}/{language}/{name}": reason
            for (task, language), group in group_records(records).items()
            if any(r["reference"].strip() for r in group)
            for name, reason in metric_gaps(task, language, [r["reference"] for r in group]).items()}


def format_table(scores: dict[str, float], counts: dict[str, int], unavailable: dict[str, str] | None = None) -> str:
    """The scores as an aligned text table: task, language, samples, metric, score; then each unavailable metric
    with its reason."""
    rows = [("task", "lang", "n", "metric", "score")]
    for key, value in scores.items():
        task, language, name = key.split("/")
        rows.append((task, language, str(counts[f"{task}/{language}"]), name, f"{value:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in
                                enumerate(zip(row, widths))) for row in rows)
    return table + "".join(f"\n{key}: unavailable: {reason}" for key, reason in (unavailable or {}).items())

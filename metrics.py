"""Scores for SALMONN answers, any task: WER, CER, BLEU, ROUGE-L, the caption metrics (CIDEr-D, METEOR, SPICE,
SPIDEr), label accuracy and language match; the emotion labels and words they read, and which language a text is
in. The challenge's own metric (the HumDial emotion trajectory) is humdial/trajectory.py, added by
humdial.scoring.HumDialScorer.

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
- Emotion words (EMOTION_WORDS): each label's synonym family in both languages; negated words name nothing.
- Language match: % of answers written in their dialogue's language (`written_language`); it needs no
  reference, so blind test sets get it too.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jiwer
import sacrebleu
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

_english_normalizer = EnglishTextNormalizer()
_basic_normalizer = BasicTextNormalizer()


# ------------------------------------------------------------------------------------ labels and languages
# The seven emotion labels (Ekman's six and neutral: HumDial's set, and most emotion corpora's).
EMOTIONS = ("happy", "sad", "anger", "fear", "neutral", "surprise", "disgust")

# Other spellings of a label seen in emotion corpora and Chinese releases (convert.py counts each use).
LABEL_ALIASES = {
    "happiness": "happy", "joy": "happy", "joyful": "happy", "glad": "happy", "开心": "happy", "高兴": "happy",
    "sadness": "sad", "unhappy": "sad", "难过": "sad", "悲伤": "sad", "伤心": "sad",
    "angry": "anger", "mad": "anger", "生气": "anger", "愤怒": "anger",
    "fearful": "fear", "afraid": "fear", "scared": "fear", "害怕": "fear", "恐惧": "fear",
    "calm": "neutral", "中性": "neutral", "平静": "neutral",
    "surprised": "surprise", "surprising": "surprise", "惊讶": "surprise", "吃惊": "surprise",
    "disgusted": "disgust", "disgusting": "disgust", "厌恶": "disgust", "反感": "disgust",
}


def canonical_emotion(label: str) -> str:
    """One of EMOTIONS for a label or a known alias ('Angry', '生气', 'anger'); ValueError if unknown."""
    key = label.strip().lower()
    if key in EMOTIONS:
        return key
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    raise ValueError(f"unknown emotion label {label!r}; expected one of {', '.join(EMOTIONS)} "
                     "(or an alias such as angry, surprised)")


# CJK ideographs: the unified block, extension A and the compatibility block.
WRITTEN_LANGUAGES = ("zh", "en")  # what written_language tells apart
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_CHARACTER = re.compile(f"[{CJK_RANGES}]")
_LATIN_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")


def is_chinese(text: str) -> bool:
    """True when the text contains CJK ideographs."""
    return bool(CJK_CHARACTER.search(text))


def written_language(text: str) -> str | None:
    """'zh' when CJK ideographs outnumber Latin words, else 'en'; None for text with neither (empty, symbols).

    A Chinese character is weighed against an English word, not a letter, so "收到offer很开心" stays Chinese
    and an English answer quoting one Chinese word stays English.
    """
    cjk, latin = len(CJK_CHARACTER.findall(text)), len(_LATIN_WORD.findall(text))
    if cjk == latin == 0:
        return None
    return "zh" if cjk > latin else "en"


def text_language(text: str) -> str:
    """The language a text is written in, of the two this repo serves (written_language; English for text with
    neither)."""
    return written_language(text) or "en"


def normalize(text: str, language: str) -> str:
    """Whisper's English normaliser for 'en', its basic (punctuation-stripping) one for anything else."""
    if language == "en":
        return _english_normalizer(text)
    return _basic_normalizer(text).strip()


def check_pairs(references: list[str], hypotheses: list[str]) -> None:
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no references to score")


def wer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus word error rate (%) of English text after Whisper's English normalisation."""
    check_pairs(references, hypotheses)
    refs = [normalize(r, "en") for r in references]
    hyps = [normalize(h, "en") for h in hypotheses]
    if not any(r.split() for r in refs):
        raise ValueError("WER is undefined: every reference is empty after normalisation")
    return 100.0 * jiwer.process_words(refs, hyps).wer


def cer(references: list[str], hypotheses: list[str]) -> float:
    """Corpus character error rate (%) for Chinese: punctuation and all whitespace removed first."""
    check_pairs(references, hypotheses)
    refs = [re.sub(r"\s+", "", normalize(r, "zh")) for r in references]
    hyps = [re.sub(r"\s+", "", normalize(h, "zh")) for h in hypotheses]
    if not any(refs):
        raise ValueError("CER is undefined: every reference is empty after normalisation")
    return 100.0 * jiwer.process_characters(refs, hyps).cer


def bleu(references: list[str], hypotheses: list[str], language: str = "en") -> float:
    """sacrebleu corpus BLEU (0-100), one reference per hypothesis; 'zh' uses sacrebleu's Chinese tokenizer."""
    check_pairs(references, hypotheses)
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
    check_pairs(references, hypotheses)
    scores = [rouge_l_pair(rouge_tokens(r, language), rouge_tokens(h, language))
              for r, h in zip(references, hypotheses)]
    return 100.0 * sum(scores) / len(scores)


# ------------------------------------------------------------------------------------------ emotion words
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


def emotion_mentions(answer: str) -> list[tuple[int, tuple[str, ...]]]:
    """(position, labels) of each emotion word the answer asserts, in order; negated words are left out."""
    mentions = []
    for match in _EMOTION_RE.finditer(answer):
        if not _NEGATION_BEFORE_RE.search(answer[max(0, match.start() - 40):match.start()]):
            mentions.append((match.start(), _WORD_EMOTIONS[re.sub(r"\s+", " ", match.group(0).lower())]))
    return mentions


def extract_emotions(answer: str) -> list[str]:
    """The emotions an answer names, in order of appearance, one entry per word (two for a word naming two).

    Repeats are kept, never collapsed: "sad at first, still sad, then happy" is [sad, sad, happy]. Negated words
    ("not happy", "不再生气") name nothing. Which words go with which turn is humdial.trajectory's business.
    """
    return [label for _, labels in emotion_mentions(answer) for label in labels]


# ------------------------------------------------------------------------------------------------- language
def language_match(answers: list[str], languages: list[str]) -> float:
    """% of answers written in their dialogue's language ('zh' or 'en'); an empty answer matches neither."""
    if len(answers) != len(languages):
        raise ValueError(f"{len(answers)} answers but {len(languages)} languages")
    if not answers:
        raise ValueError("no answers to score")
    unknown = set(languages) - set(WRITTEN_LANGUAGES)
    if unknown:
        raise ValueError(f"unknown languages {sorted(unknown)}; expected one of {', '.join(WRITTEN_LANGUAGES)}")
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
    check_pairs(references, hypotheses)
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
    mentions = emotion_mentions(text)
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
    check_pairs(references, hypotheses)
    if task == "QA" and not all(is_closed_form(r, language) for r in references):
        return None
    hits = [label_hit(task, r, h, language) for r, h in zip(references, hypotheses)]
    return 100.0 * sum(hits) / len(hits)


# ---------------------------------------------------------------------------------------------- decoded records
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


def group_records(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by (task, language), sorted."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        groups[record["task"], record_language(record)].append(record)
    return dict(sorted(groups.items()))


class Scorer:
    """Scores decoded records ({task, prediction, reference, language?, ...}) per (task, language) group with
    the generic metrics. A challenge layer subclasses it to add its own tasks' metrics (humdial.scoring); the
    runner and the decode call only `score` and `readings`, so the engine knows no challenge."""

    def group_scores(self, task: str, language: str, records: list[dict[str, Any]]) -> dict[str, float]:
        """The metrics that fit one task in one language. language_match needs no reference, so a blind test set
        gets it too; the text metrics need references."""
        hyps = [r["prediction"] for r in records]
        return {**reference_scores(task, language, records),
                "language_match": language_match(hyps, [language] * len(hyps))}

    def score(self, records: list[dict[str, Any]]) -> dict[str, float]:
        """Flat `{task}/{language}/{metric}` -> score (%); the language is read from the reference when absent."""
        return {f"{task}/{language}/{name}": value
                for (task, language), group in group_records(records).items()
                for name, value in self.group_scores(task, language, group).items()}

    def readings(self, record: dict[str, Any]) -> dict[str, Any]:
        """Fields added to a record's predictions.jsonl line: what a metric read from the answer, so a score can be
        checked line by line. The generic metrics add none."""
        return {}


def unavailable_scores(records: list[dict[str, Any]]) -> dict[str, str]:
    """`{task}/{language}/{metric}` -> why, for the metrics that Scorer.score could not compute (caption metrics
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

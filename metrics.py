"""Scores for SALMONN answers: WER, CER, BLEU, ROUGE-L and emotion-trajectory accuracy.

Conventions (the README repeats them):
- Every score is a percentage in [0, 100] (WER and CER can exceed 100 when the answer has many insertions).
- WER and CER are corpus-level: total edits / total reference tokens, via jiwer.
- English text goes through openai-whisper's `EnglishTextNormalizer`; Chinese and other text through its
  `BasicTextNormalizer` (lower case, punctuation and symbols removed), then whitespace is dropped for CER.
- BLEU is sacrebleu's corpus BLEU (tokenizer `13a` for English, `zh` for Chinese).
- ROUGE-L is the mean over pairs of the LCS F1 (beta = 1); Chinese is compared character by character,
  English word by word.
- Emotion trajectory: see `extract_emotions` and `emotion_trajectory_scores`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import jiwer
import sacrebleu
from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

from convert import EMOTIONS  # the 7 HumDial labels, defined once with the data

# Words that name an emotion, mapped to one of EMOTIONS. Longer entries win over shorter ones at the same
# position, so "不开心" is sad rather than happy and "unhappy" never reads as "happy".
EMOTION_WORDS: dict[str, tuple[str, ...]] = {
    "happy": ("happy", "happiness", "happily", "joy", "joyful", "joyous", "glad", "cheerful", "delighted",
              "开心", "高兴", "快乐", "愉快", "喜悦", "兴奋"),
    "sad": ("sad", "sadness", "sadly", "unhappy", "sorrow", "sorrowful", "upset", "depressed", "heartbroken",
            "难过", "伤心", "悲伤", "沮丧", "失落", "不开心", "不高兴", "悲痛"),
    "anger": ("anger", "angry", "angrily", "furious", "fury", "rage", "annoyed", "irritated", "mad",
              "生气", "愤怒", "恼火", "气愤", "发火"),
    "fear": ("fear", "fearful", "afraid", "scared", "frightened", "terrified", "anxious", "nervous", "worried",
             "害怕", "恐惧", "惊恐", "担心", "紧张", "焦虑"),
    "neutral": ("neutral", "calm", "calmly", "平静", "中性", "中立", "平和", "冷静"),
    "surprise": ("surprise", "surprised", "surprising", "astonished", "amazed", "shocked",
                 "惊讶", "吃惊", "惊奇", "震惊"),
    "disgust": ("disgust", "disgusted", "disgusting", "revolted", "repulsed",
                "厌恶", "恶心", "反感", "嫌弃"),
}

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def is_chinese(text: str) -> bool:
    """True when the text contains CJK ideographs: the cue for character-level scoring."""
    return bool(_CJK.search(text))


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
    return re.findall(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\s\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+",
                      normalize(text, language))


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


def _emotion_pattern() -> re.Pattern[str]:
    """One alternation over every emotion word, longest first; English words need word boundaries."""
    words = sorted((w for ws in EMOTION_WORDS.values() for w in ws), key=len, reverse=True)
    parts = [re.escape(w) if is_chinese(w) else rf"\b{re.escape(w)}\b" for w in words]
    return re.compile("|".join(parts), re.IGNORECASE)


_EMOTION_RE = _emotion_pattern()
_WORD_TO_EMOTION = {w.lower(): label for label, ws in EMOTION_WORDS.items() for w in ws}


def canonical_emotion(word: str) -> str:
    """Map a label or emotion word ('Angry', '生气', 'anger') to one of EMOTIONS; ValueError if unknown."""
    label = _WORD_TO_EMOTION.get(word.strip().lower())
    if label is None:
        raise ValueError(f"unknown emotion label {word!r}; expected one of {', '.join(EMOTIONS)}")
    return label


def extract_emotions(answer: str) -> list[str]:
    """The emotions an answer names, in order of appearance, one entry per mention.

    Repeats are kept, never collapsed: "sad at first, still sad, then happy" is [sad, sad, happy], which is
    how a three-turn gold trajectory (sad, sad, happy) is spelled. The price is that an answer which names an
    emotion once for several turns ("stayed sad throughout") scores those later turns as missing. Negation is
    not parsed in English ("not happy" reads as happy); the common Chinese negated forms (不开心, 不高兴) are
    listed as sad.
    """
    return [_WORD_TO_EMOTION[m.group(0).lower()] for m in _EMOTION_RE.finditer(answer)]


@dataclass(frozen=True)
class TrajectoryScores:
    exact_match: float      # % of samples whose extracted sequence equals the gold sequence exactly
    turn_accuracy: float    # % of gold turns whose position holds the right emotion (micro-average over turns)
    num_samples: int
    num_turns: int


def emotion_trajectory_scores(gold: list[list[str]], answers: list[str]) -> TrajectoryScores:
    """Compare the emotions extracted from each answer with its gold per-turn labels.

    Turn i of a sample is right when the i-th extracted emotion equals gold label i. Scoring runs over the gold
    length: a missing prediction counts as wrong and extra predictions beyond it are ignored by the per-turn
    accuracy, but they do break the exact match (which needs equal length and order).
    """
    _check_pairs(gold, answers)
    exact, correct, turns = 0, 0, 0
    for labels, answer in zip(gold, answers):
        expected = [canonical_emotion(label) for label in labels]
        predicted = extract_emotions(answer)
        exact += predicted == expected
        correct += sum(p == e for p, e in zip(predicted, expected))
        turns += len(expected)
    if turns == 0:
        raise ValueError("no gold emotion labels to score")
    return TrajectoryScores(exact_match=100.0 * exact / len(gold), turn_accuracy=100.0 * correct / turns,
                            num_samples=len(gold), num_turns=turns)

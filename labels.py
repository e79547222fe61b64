"""Labels and languages: the HumDial tasks, the emotion label set and its aliases, and which language a text is in.

A leaf module (standard library only): convert.py, the dataset, the metrics and the demo corpus all read these
facts from here.
"""
from __future__ import annotations

import re

# HumDial Track 1 tasks, by their number in the release's file names (HD-Track1-T1.jsonl -> 1).
TASKS = ("emotional_trajectory", "emotional_reasoning", "empathy")
TASK_BY_NUMBER = {"1": "emotional_trajectory", "2": "emotional_reasoning", "3": "empathy"}

# The seven HumDial emotion labels.
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

# The plain word for each label in each language (the demo corpus's answers use it).
LABEL_WORDS = {
    "en": {"happy": "happy", "sad": "sad", "anger": "angry", "fear": "afraid", "neutral": "neutral",
           "surprise": "surprised", "disgust": "disgusted"},
    "zh": {"happy": "开心", "sad": "难过", "anger": "生气", "fear": "害怕", "neutral": "平静",
           "surprise": "惊讶", "disgust": "反感"},
}

# CJK ideographs: the unified block, extension A and the compatibility block.
CJK_RANGES = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK_CHARACTER = re.compile(f"[{CJK_RANGES}]")


def canonical_emotion(label: str) -> str:
    """One of EMOTIONS for a label or a known alias ('Angry', '生气', 'anger'); ValueError if unknown."""
    key = label.strip().lower()
    if key in EMOTIONS:
        return key
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    raise ValueError(f"unknown emotion label {label!r}; expected one of {', '.join(EMOTIONS)} "
                     "(or an alias such as angry, surprised)")


def trajectory_summary(emotions: list[str], language: str) -> str:
    """The demo corpus's trajectory answer: every turn's emotion named once, in order ("still X" when it did not change)."""
    words = [LABEL_WORDS[language][e] for e in emotions]
    if language == "zh":
        parts = [f"你一开始很{words[0]}"]
        for i in range(1, len(words)):
            lead = "最后" if i == len(words) - 1 else "接着"
            parts.append(f"{lead}依然{words[i]}" if emotions[i] == emotions[i - 1] else f"{lead}变得{words[i]}")
        return "，".join(parts) + "。"
    parts = [f"You started {words[0]}"]
    for i in range(1, len(words)):
        lead = "and ended up" if i == len(words) - 1 else "then"
        parts.append(f"{lead} still {words[i]}" if emotions[i] == emotions[i - 1] else f"{lead} {words[i]}")
    return ", ".join(parts) + "."


def is_chinese(text: str) -> bool:
    """True when the text contains CJK ideographs."""
    return bool(CJK_CHARACTER.search(text))


def text_language(text: str) -> str:
    """'zh' for text with CJK ideographs, else 'en': the two languages of HumDial."""
    return "zh" if is_chinese(text) else "en"

"""Labels and languages: the HumDial tasks, the emotion label set and its aliases, and which language a text is in.

A leaf module (standard library only): convert.py, the dataset, the metrics and the demo corpus all read these
facts from here.
"""
from __future__ import annotations

import random
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
_LATIN_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")


def canonical_emotion(label: str) -> str:
    """One of EMOTIONS for a label or a known alias ('Angry', '生气', 'anger'); ValueError if unknown."""
    key = label.strip().lower()
    if key in EMOTIONS:
        return key
    if key in LABEL_ALIASES:
        return LABEL_ALIASES[key]
    raise ValueError(f"unknown emotion label {label!r}; expected one of {', '.join(EMOTIONS)} "
                     "(or an alias such as angry, surprised)")


# Words the demo corpus's answers draw on, several per label, as real answers vary them (metrics reads them all).
ANSWER_WORDS = {
    "en": {"happy": ("happy", "glad", "joyful", "delighted", "cheerful", "excited"),
           "sad": ("sad", "upset", "disappointed", "heartbroken", "sorrowful"),
           "anger": ("angry", "annoyed", "furious", "frustrated", "irritated"),
           "fear": ("afraid", "scared", "anxious", "nervous", "worried"),
           "neutral": ("calm", "relaxed", "composed"),
           "surprise": ("surprised", "amazed", "astonished", "shocked"),
           "disgust": ("disgusted", "revolted", "repulsed", "sickened")},
    "zh": {"happy": ("开心", "高兴", "兴奋", "喜悦", "欣喜", "愉快"),
           "sad": ("难过", "伤心", "失落", "沮丧", "悲伤"),
           "anger": ("生气", "愤怒", "恼火", "气愤"),
           "fear": ("害怕", "担心", "紧张", "焦虑", "恐惧"),
           "neutral": ("平静", "平和", "冷静"),
           "surprise": ("惊讶", "吃惊", "震惊", "诧异"),
           "disgust": ("厌恶", "恶心", "嫌弃")},  # not 反感: "反感到X" reads as 感到 (feel), not "to X"
}
_OPENINGS = {"en": ("You started out {}", "At first you felt {}", "In the beginning you were {}",
                    "You went from {}"),
             "zh": ("你一开始很{}", "你先是感到{}", "刚开始你有些{}", "你的情绪从{}")}
_STEPS = {"en": (", then became {}", ", then felt {}", ", and later you were {}", " to {}"),
          "zh": ("，后来变得{}", "，接着又感到{}", "，然后有些{}", "到{}")}
_STILL = {"en": ", then were still {}", "zh": "，接着依然{}"}
_CALM_ENDINGS = {"en": (", and now you sound calm again", "; by the end you were calm"),
                 "zh": ("，现在已经平静了下来", "，最后回归平静")}


def trajectory_summary(emotions: list[str], language: str, rng: random.Random | None = None) -> str:
    """The demo corpus's trajectory answer, in varied natural language as real answers are: a synonym for each
    turn's emotion (sometimes two for one turn), "from X to Y" or "first ..., then ..." structure, "still X"
    for a repeat, and a closing neutral question turn sometimes called calm, sometimes left unnamed.

    rng None gives the plain form (the first word of each label, no variation): tests read it back."""
    pick = (lambda options: options[0]) if rng is None else rng.choice
    words = ANSWER_WORDS.get(language, ANSWER_WORDS["en"])
    lang = language if language in _OPENINGS else "en"
    closing_calm = len(emotions) > 1 and emotions[-1] == "neutral"  # HumDial's closing question turn
    named = emotions[:-1] if closing_calm else emotions
    style = pick(range(len(_OPENINGS[lang])))  # 0..2: "first ..., then ...", 3: "from X to Y to Z"

    def said(label: str) -> str:
        first = pick(words[label])
        if rng is not None and rng.random() < 0.15:  # one turn, two words ("upset and disappointed", 又难过又失落)
            second = rng.choice([w for w in words[label] if w != first] or [first])
            return f"{first}又{second}" if lang == "zh" else f"{first} and {second}"
        return first

    text = _OPENINGS[lang][style].format(said(named[0]))
    for previous, label in zip(named, named[1:]):
        if label == previous and style != 3:
            text += _STILL[lang].format(said(label))
        else:
            text += (_STEPS[lang][3] if style == 3 else _STEPS[lang][pick(range(3))]).format(said(label))
    if closing_calm and (rng is None or rng.random() < 0.5):
        text += pick(_CALM_ENDINGS[lang])
    return text + ("。" if lang == "zh" else ".")


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
    """The language a text is written in, of HumDial's two (written_language; English for text with neither)."""
    return written_language(text) or "en"

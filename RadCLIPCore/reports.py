"""Free-text reports -> one text per anatomy (fVLM): split into sentences, assign each sentence to
the anatomies it names (a configurable lexicon of names and synonyms), and give anatomies that no
sentence mentions a normal template. Deterministic, no network."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import RadCLIPError
from .fileutil import read_json

NORMAL_TEMPLATE = "{anatomy} shows no significant abnormalities."
# a sentence ends at . ! ? ; or a line break, but not inside a number ("3.5 cm") or a common abbreviation
_ABBREVIATIONS = ("e.g", "i.e", "vs", "approx", "cm", "mm", "dr", "no", "fig")
_SPLIT = re.compile(r"(?<=[.!?;])\s+|\n+")


def split_sentences(report: str) -> list[str]:
    parts, current = [], ""
    for piece in _SPLIT.split(report.strip()):
        piece = " ".join(piece.split())
        if not piece:
            continue
        current = f"{current} {piece}".strip() if current else piece
        last_word = current.rstrip(".").rsplit(" ", 1)[-1].lower()
        if current.endswith(".") and last_word in _ABBREVIATIONS:
            continue  # "approx. 3 cm": keep going
        parts.append(current)
        current = ""
    if current:
        parts.append(current)
    return parts


def read_lexicon(path_or_dict) -> dict:
    """{label value: [names and synonyms]} from a dict or a JSON file ({"5": ["liver", "hepatic"]})."""
    data = path_or_dict
    if isinstance(path_or_dict, (str, Path)):
        data = read_json(path_or_dict, f"lexicon '{path_or_dict}'")
    lexicon = {}
    for key, words in data.items():
        words = [words] if isinstance(words, str) else list(words)
        if not words or not all(isinstance(w, str) and w.strip() for w in words):
            raise RadCLIPError(f"lexicon entry {key!r} needs at least one non-empty name")
        lexicon[int(key)] = [w.strip() for w in words]
    return lexicon


def _pattern(words):
    # whole words, case-insensitive; underscores in structure names read as spaces
    alternatives = sorted((re.escape(w.replace("_", " ")).replace(r"\ ", r"[\s_-]+") for w in words), key=len,
                          reverse=True)
    return re.compile(r"\b(?:" + "|".join(alternatives) + r")\b", re.IGNORECASE)


def assign_sentences(sentences, lexicon: dict) -> dict:
    """{label: [sentences naming it]} (a sentence naming two anatomies goes to both)."""
    patterns = {label: _pattern(words) for label, words in lexicon.items()}
    return {label: [s for s in sentences if rx.search(s)] for label, rx in patterns.items()}


def anatomy_texts(report: str, lexicon: dict, names: dict | None = None, normal_template=NORMAL_TEMPLATE):
    """({label: text}, {label: is_normal}): each anatomy's sentences joined, or the normal template
    with the anatomy's name (from `names`, else its first lexicon word)."""
    assigned = assign_sentences(split_sentences(report), lexicon)
    texts, normal = {}, {}
    for label, sentences in assigned.items():
        if sentences:
            texts[label], normal[label] = " ".join(sentences), False
        else:
            name = (names or {}).get(label) or lexicon[label][0]
            texts[label] = normal_template.format(anatomy=name.replace("_", " ").capitalize())
            normal[label] = True
    return texts, normal


# --------------------------------------------------------------------------- truth from reports
NEGATION = ("no", "without", "negative for", "free of", "absence of", "resolved")


def finding_truth(report: str, lexicon: dict, findings: dict) -> dict:
    """{(label, finding): 0/1}: 1 when a sentence about the anatomy names the finding (whole word)
    and no negation cue (no, without, negative for, ...) precedes it in that sentence."""
    assigned = assign_sentences(split_sentences(report), lexicon)
    truth = {}
    for label, words in findings.items():
        for finding in words:
            rx = re.compile(r"\b" + re.escape(finding) + r"\b", re.IGNORECASE)
            hit = 0
            for sentence in assigned.get(label, []):
                m = rx.search(sentence)
                if m and not any(re.search(r"\b" + re.escape(cue) + r"\b", sentence[:m.start()], re.IGNORECASE)
                                 for cue in NEGATION):
                    hit = 1
            truth[(label, finding)] = hit
    return truth

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


# --------------------------------------------------------------------------- findings a text asserts
NEGATION = ("no", "without", "negative for", "free of", "absence of", "resolved")


def read_findings(path_or_dict, lexicon: dict) -> dict:
    """{label value: [finding words]} (the `--findings` JSON, e.g. {"5": ["lesion", "cyst"]}); every
    label must be an anatomy of `lexicon`."""
    findings = read_lexicon(path_or_dict)
    unknown = sorted(set(findings) - set(lexicon))
    if unknown:
        raise RadCLIPError(f"the findings file names anatomy label(s) {unknown} that the lexicon does not "
                           f"(lexicon labels: {sorted(lexicon)})")
    return findings


def asserted_findings(sentences, words) -> frozenset:
    """The findings of `words` that `sentences` assert: a finding counts when a sentence names it
    (whole word, case-insensitive) and no negation cue (no, without, negative for, ...) precedes it
    in that sentence. The one reading of "which findings does this text say are present", for
    training (disease-aware positives) and evaluation (the truth of zero-shot AUC)."""
    found = set()
    for finding in words:
        rx = re.compile(r"\b" + re.escape(finding) + r"\b", re.IGNORECASE)
        for sentence in sentences:
            m = rx.search(sentence)
            if m and not any(re.search(r"\b" + re.escape(cue) + r"\b", sentence[:m.start()], re.IGNORECASE)
                             for cue in NEGATION):
                found.add(finding.lower())
                break
    return frozenset(found)


def finding_truth(report: str, lexicon: dict, findings: dict) -> dict:
    """{(label, finding): 0/1}: 1 when a sentence about the anatomy asserts the finding
    (`asserted_findings`)."""
    assigned = assign_sentences(split_sentences(report), lexicon)
    truth = {}
    for label, words in findings.items():
        present = asserted_findings(assigned.get(label, []), words)
        for finding in words:
            truth[(label, finding)] = int(finding.lower() in present)
    return truth


def anatomy_groups(texts: dict, normal: dict, findings: dict | None) -> dict:
    """{label: positive-group key} of one study's anatomy texts (`anatomy_texts`) for the anatomy
    loss: normal texts share one group per anatomy; with a findings vocabulary ({label: [words]}),
    abnormal texts of an anatomy that assert the same non-empty set of its findings share a group
    (fVLM's "similarly diseased": paraphrases of one finding are not pushed apart), and a text whose
    every sentence names one of the anatomy's findings only to negate it ("No lesion in the liver.")
    is a normal finding: it joins the anatomy's normal group (fVLM's normal-finding false negatives);
    any other text is its own group (identical texts share it)."""
    groups = {}
    for label, text in texts.items():
        if normal[label]:
            groups[label] = ("normal", label)
            continue
        words = findings.get(label, ()) if findings else ()
        sentences = split_sentences(text)
        asserted = asserted_findings(sentences, words)
        if asserted:
            groups[label] = ("findings", label, tuple(sorted(asserted)))
        elif words and all(_names_any(s, words) for s in sentences):
            groups[label] = ("normal", label)  # only pertinent negatives of its findings
        else:
            groups[label] = ("text", label, text)
    return groups


def _names_any(sentence: str, words) -> bool:
    return any(re.search(r"\b" + re.escape(w) + r"\b", sentence, re.IGNORECASE) for w in words)

"""Which segment is which anatomy: a lexicon of report-level anatomies and the segment names they cover.

A segmentation names its segments after a segmenter's classes ("lung_upper_lobe_left"), after Slicer's
standard terminology ("superior lobe of left lung"), or by hand ("left lung"). A report speaks of
anatomies ("lung", "pulmonary"). The lexicon joins them, so that the segments of one anatomy are pooled
together and the report's sentences about it find them.

The bundled lexicon (`load_anatomy_lexicon()`) covers every class of TotalSegmentator's `total` task: a
segmentation made by TotalSegmentator, or by SlicerTotalSegmentator with or without its "use standard
segment names", needs no lexicon argument.

File format (UTF-8 JSON; `resources/lexicons/totalsegmentator_total.json` is the example)::

    {
      "description": "free text (optional)",
      "source": {"segmenter": "TotalSegmentator", "task": "total", ...},     (optional, free keys)
      "anatomies": [                                                         (required, in report order)
        {
          "name": "lung",                                                    (required, unique)
          "classes": ["lung_upper_lobe_left", "lung_lower_lobe_left", ...],  (required, >= 1 segment name)
          "slicer_names": ["superior lobe of left lung", ...],               (optional)
          "synonyms": ["lungs", "pulmonary", ...],                           (optional, report words)
          "_comment": "why this grouping"                                    (optional; keys starting "_" are notes)
        },
        ...
      ]
    }

Matching ignores case and treats "_", "-" and spaces alike ("Lung_Upper-Lobe left" is
"lung upper lobe left"). A segment name matches an anatomy when it is one of its classes, Slicer names,
synonyms or its name; failing that, the name without the words "left" and "right" is tried ("left lung"
-> "lung"). A name may therefore belong to one anatomy only: a class, Slicer name or synonym that two
anatomies claim is an error in the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RadCLIPError
from .fileutil import read_json

BUNDLED_LEXICON = Path(__file__).parent / "resources" / "lexicons" / "totalsegmentator_total.json"
_LIST_KEYS = ("classes", "slicer_names", "synonyms")
_SIDES = {"left", "right"}


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, "_" and "-" as spaces, runs of spaces as one."""
    return " ".join(re.sub(r"[_\-\s]+", " ", str(name)).lower().split())


@dataclass(frozen=True)
class AnatomyEntry:
    """One anatomy of a lexicon: its segment classes, their Slicer standard names and report synonyms."""
    name: str
    classes: tuple[str, ...]
    slicer_names: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()


@dataclass(frozen=True)
class AnatomyLexicon:
    """Report-level anatomies and the segment names each covers (see the module docstring).

    `anatomies` is the lexicon's order (the order of `group`'s result); `source` is the file's free
    "source" object (for the bundled lexicon: segmenter, task and the TotalSegmentator version)."""
    entries: tuple[AnatomyEntry, ...]
    source: dict = field(default_factory=dict, compare=False)
    index: dict = field(init=False, repr=False, compare=False)  # normalised name -> anatomy

    def __post_init__(self):
        index, seen = {}, set()
        for entry in self.entries:
            if entry.name in seen:
                raise RadCLIPError(f"anatomy '{entry.name}' is listed twice")
            seen.add(entry.name)
            for kind, names in (("name", (entry.name,)), ("class", entry.classes),
                                ("Slicer name", entry.slicer_names), ("synonym", entry.synonyms)):
                for name in names:
                    key = normalize_name(name)
                    if not key:
                        raise RadCLIPError(f"anatomy '{entry.name}' has an empty {kind}")
                    owner = index.setdefault(key, entry.name)
                    if owner != entry.name:
                        raise RadCLIPError(f"{kind} '{name}' is claimed by two anatomies, '{owner}' and '{entry.name}'")
        object.__setattr__(self, "index", index)

    @property
    def anatomies(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, anatomy: str) -> AnatomyEntry:
        for e in self.entries:
            if e.name == anatomy:
                return e
        raise RadCLIPError(f"no anatomy '{anatomy}' in the lexicon (it has {', '.join(self.anatomies)})")

    def synonyms(self, anatomy: str) -> list[str]:
        """The report words for `anatomy` besides its name (e.g. lung: "lungs", "pulmonary")."""
        return list(self.entry(anatomy).synonyms)

    def classes(self, anatomy: str) -> list[str]:
        return list(self.entry(anatomy).classes)

    def slicer_names(self, anatomy: str) -> list[str]:
        return list(self.entry(anatomy).slicer_names)

    def anatomy_of(self, segment_name: str) -> str | None:
        """The anatomy a segment name belongs to, or None. Matches a class id ("kidney_left"), a Slicer
        standard name ("left kidney"), or the anatomy's name or a synonym ("Kidney", "renal"); failing
        those, the name without "left"/"right" ("left lung" -> "lung")."""
        key = normalize_name(segment_name)
        if key in self.index:
            return self.index[key]
        unsided = " ".join(w for w in key.split() if w not in _SIDES)
        return self.index.get(unsided) if unsided and unsided != key else None

    def group(self, segment_names: dict[int, str]) -> tuple[dict[str, list[int]], list[str]]:
        """({anatomy: sorted labels of its segments}, names the lexicon does not know).

        `segment_names` is {label value: segment name}, e.g. a label map's names. Anatomies appear in
        lexicon order and only when some segment belongs to them; unknown names keep their label order
        (each once) — they are returned, never silently dropped."""
        found, unknown = {}, []
        for label in sorted(segment_names):
            name = segment_names[label]
            anatomy = self.anatomy_of(name)
            if anatomy is None:
                if name not in unknown:
                    unknown.append(name)
            else:
                found.setdefault(anatomy, []).append(int(label))
        return {a: found[a] for a in self.anatomies if a in found}, unknown


def _string_list(value, what: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RadCLIPError(f"{what} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _entry(item, where: str, i: int) -> AnatomyEntry:
    if not isinstance(item, dict):
        raise RadCLIPError(f"{where}: anatomy #{i + 1} must be an object with a name and classes")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise RadCLIPError(f"{where}: anatomy #{i + 1} has no name")
    name = name.strip()
    unknown = [k for k in item if k not in ("name",) + _LIST_KEYS and not k.startswith("_")]
    if unknown:
        raise RadCLIPError(f"{where}: anatomy '{name}' has unknown key(s) {', '.join(map(repr, unknown))} "
                           f"(known: name, {', '.join(_LIST_KEYS)})")
    if not item.get("classes"):
        raise RadCLIPError(f"{where}: anatomy '{name}' lists no classes (the segment names it covers)")
    lists = {k: _string_list(item.get(k, []), f"{where}: '{k}' of anatomy '{name}'") for k in _LIST_KEYS}
    return AnatomyEntry(name, **lists)


def load_anatomy_lexicon(path=None) -> AnatomyLexicon:
    """The lexicon in `path` (format: the module docstring), or the bundled TotalSegmentator `total`
    lexicon when `path` is None. A bad file is a one-line RadCLIPError naming it."""
    path = Path(path) if path is not None else BUNDLED_LEXICON
    where = f"anatomy lexicon '{path}'"
    data = read_json(path, where)
    anatomies = data.get("anatomies") if isinstance(data, dict) else None
    if not isinstance(anatomies, list) or not anatomies:
        raise RadCLIPError(f"{where} lists no anatomies (expected "
                           '{"anatomies": [{"name": ..., "classes": [...]}, ...]})')
    source = data.get("source", {})
    entries = tuple(_entry(item, where, i) for i, item in enumerate(anatomies))
    try:
        return AnatomyLexicon(entries, source if isinstance(source, dict) else {})
    except RadCLIPError as exc:
        raise RadCLIPError(f"{where}: {exc}") from None

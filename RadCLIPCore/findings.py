"""Is finding X present, and where? Each finding scored on its own, as the peers that report clinical
results do (CT-CLIP, Merlin, fVLM): never a softmax over a list of findings, since several can be
present at once and "none" is a common answer.

For a finding (and optionally an anatomy) the positive prompts ("{finding}.", "There is {finding}.",
...) and the negative prompts ("No {finding}.", ...) are each ensembled in embedding space (CLIP's
prompt ensembling: the mean of the unit text embeddings, renormalised), and

    P(present) = softmax(cos(x, positive) / T, cos(x, negative) / T)[0]

at the model's temperature T: the same two-prompt score evaluation's zero-shot AUC uses
(`present_probability` is the one code path). For a volume, each slice gets the same score from
its own embedding, and the *evidence* curve is the softmax over the slices of
(cos(slice, positive) - cos(slice, negative)) / T: where along the volume the finding is more
"present" than "absent" (it sums to 1, like a prompt's relevance; above 1/n is above average).

An operating point (`OperatingPoints`, written by `evaluate`) turns a probability into present or
absent at a threshold chosen on labelled data, with the sensitivity and specificity it was chosen
at. Probabilities are not calibrated (MedKLIP's maintainers: judge zero-shot by AUC): without an
operating point the answer is a probability only, and says so.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import weakref
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .embedding_cache import hash_weights
from .errors import RadCLIPError
from .fileutil import read_text
from .labelmaps import LabelMap

MAX_FINDING_CHARS = 200
OPERATING_POINTS_FILE = "operating_points.json"
OPERATING_POINTS_FORMAT = "radclip-operating-points"
GLOBAL = ""  # the anatomy key of a finding scored on the whole volume


@dataclass(frozen=True)
class FindingTemplates:
    """Prompt templates for one finding: `{finding}` (and `{anatomy}` in the per-anatomy ones)."""

    positive: tuple = ("{finding}.", "There is {finding}.", "{finding} is present.", "Findings of {finding}.")
    negative: tuple = ("No {finding}.", "There is no {finding}.", "{finding} is absent.", "No evidence of {finding}.")
    anatomy_positive: tuple = ("{finding} in the {anatomy}.", "There is {finding} in the {anatomy}.",
                               "The {anatomy} shows {finding}.")
    anatomy_negative: tuple = ("No {finding} in the {anatomy}.", "There is no {finding} in the {anatomy}.",
                               "The {anatomy} shows no {finding}.")

    def __post_init__(self):
        for name in ("positive", "negative", "anatomy_positive", "anatomy_negative"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
                raise RadCLIPError(f"finding templates: '{name}' must be a non-empty list of texts")
            for t in value:
                if not isinstance(t, str) or "{finding}" not in t:
                    raise RadCLIPError(f"finding template {t!r} ({name}) has no {{finding}}")
                if name.startswith("anatomy") and "{anatomy}" not in t:
                    raise RadCLIPError(f"finding template {t!r} ({name}) has no {{anatomy}}")
                try:
                    t.format(finding="x", anatomy="y")
                except (KeyError, IndexError, ValueError) as exc:
                    raise RadCLIPError(f"finding template {t!r} ({name}) is not a valid template ({exc})") from None
            object.__setattr__(self, name, tuple(value))

    @classmethod
    def from_dict(cls, data) -> "FindingTemplates":
        """From `radclip_config.json`'s "finding_templates" or a user's JSON: any of the four lists;
        the others keep their defaults."""
        if not isinstance(data, dict):
            raise RadCLIPError("finding templates must be a JSON object with 'positive', 'negative', "
                               "'anatomy_positive' and/or 'anatomy_negative' lists")
        unknown = sorted(set(data) - {"positive", "negative", "anatomy_positive", "anatomy_negative"})
        if unknown:
            raise RadCLIPError(f"finding templates: unknown key(s) {', '.join(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    def prompts(self, finding: str, anatomy: str | None = None) -> tuple[list, list]:
        """(positive prompts, negative prompts) for a finding, on the whole image or an anatomy."""
        if anatomy:
            fill = dict(finding=finding, anatomy=anatomy)
            return [t.format(**fill) for t in self.anatomy_positive], [t.format(**fill) for t in self.anatomy_negative]
        return [t.format(finding=finding) for t in self.positive], [t.format(finding=finding) for t in self.negative]


def read_templates(path) -> FindingTemplates:
    return FindingTemplates.from_dict(_read_json(path, "finding templates"))


def check_findings(findings) -> list[str]:
    """Distinct, non-empty finding words (order kept), or a one-line error."""
    if isinstance(findings, str):
        findings = [findings]
    out = []
    for f in findings:
        if not isinstance(f, str) or not f.strip():
            raise RadCLIPError("a finding is empty: give words such as 'pleural effusion'")
        if len(f) > MAX_FINDING_CHARS:
            raise RadCLIPError(f"a finding is longer than {MAX_FINDING_CHARS} characters: {f[:40]!r}...")
        f = " ".join(f.split())
        if f.lower() not in {o.lower() for o in out}:
            out.append(f)
    if not out:
        raise RadCLIPError("no findings given: use --finding WORDS (repeatable) or --findings-file FILE")
    return out


def read_findings_file(path) -> list[str]:
    """A UTF-8 text file, one finding per line (# comments), or a JSON list of findings."""
    text = read_text(path, "findings file", "a text file, one finding per line")
    if text.lstrip().startswith("["):
        try:
            words = json.loads(text)
        except ValueError as exc:
            raise RadCLIPError(f"findings file '{path}' is not valid JSON ({exc})") from None
    else:
        words = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not words:
        raise RadCLIPError(f"findings file '{path}' holds no findings")
    return check_findings(words)


# --------------------------------------------------------------------------- the one score
def prompt_softmax(cosines, temperature: float, axis: int = -1) -> np.ndarray:
    """CLIP's probabilities: the softmax of cosine / temperature along `axis`, in float64.

    The one place this is computed: ranking prompts (over the prompts), per-slice relevance (over
    the slices), zero-shot pairs and the modality-recognition figure (over the candidate texts).
    """
    logits = torch.from_numpy(np.asarray(cosines, dtype=np.float64) / float(temperature))
    return torch.softmax(logits, dim=axis).numpy()



def ensemble(text_embeddings: np.ndarray) -> np.ndarray:
    """CLIP's prompt ensembling: the mean of unit text embeddings, renormalised to unit length."""
    e = np.asarray(text_embeddings, np.float64)
    e = e / np.linalg.norm(e, axis=-1, keepdims=True)
    mean = e.mean(0)
    return (mean / np.linalg.norm(mean)).astype(np.float32)


_PAIRS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(positives, negatives): (2, dim)}
PAIR_CACHE_SIZE = 8192


def prompt_pair(model, positives, negatives) -> np.ndarray:
    """(2, dim): the ensembled positive and negative prompts, cached per model (a volume already
    embedded then costs nothing but this cache for every finding asked again)."""
    cache = _PAIRS.setdefault(model, OrderedDict())
    key = (tuple(positives), tuple(negatives))
    pair = cache.get(key)
    if pair is None:
        emb = model.embed_texts(list(positives) + list(negatives))
        pair = np.stack([ensemble(emb[:len(positives)]), ensemble(emb[len(positives):])])
        cache[key] = pair
        while len(cache) > PAIR_CACHE_SIZE:
            cache.popitem(last=False)
    return pair


def present_probability(model, features: np.ndarray, positives, negatives) -> np.ndarray:
    """(N, dim) or (dim,) unit features -> (N,) P(present) for one finding: evaluation's zero-shot
    score; `score_findings` scores every finding the same way (`pair_probability`)."""
    pair = prompt_pair(model, positives, negatives)
    return pair_probability(model, np.atleast_2d(features) @ pair.T)


def pair_probability(model, cosines: np.ndarray) -> np.ndarray:
    """(..., 2) cosines with the (positive, negative) prompt pair -> (...) P(present): the softmax of
    the two cosines at the model's temperature. The one definition of the finding score."""
    return prompt_softmax(cosines, model.temperature, axis=-1)[..., 0]


# --------------------------------------------------------------------------- operating points
@dataclass(frozen=True)
class OperatingPoint:
    threshold: float  # present when P(present) >= threshold
    sensitivity: float
    specificity: float
    auc: float
    positives: int
    negatives: int
    rule: str = "youden"


def youden_point(truth, scores, auc: float) -> OperatingPoint:
    """The threshold that maximises Youden's J (sensitivity + specificity - 1) on the ROC curve;
    ties go to the higher threshold (fewer false positives)."""
    from sklearn.metrics import roc_curve

    truth, scores = np.asarray(truth), np.asarray(scores, np.float64)
    fpr, tpr, thresholds = roc_curve(truth, scores)
    finite = np.isfinite(thresholds)
    j = np.where(finite, tpr - fpr, -np.inf)
    best = int(np.argmax(j))  # roc_curve lists thresholds high to low: the first maximum is the highest
    return OperatingPoint(float(thresholds[best]), float(tpr[best]), float(1 - fpr[best]), float(auc),
                          int(truth.sum()), int(len(truth) - truth.sum()))


def model_fingerprint(model) -> str:
    """What a probability depends on besides the input: the projections into the joint space,
    the pooling (and adapter), the temperature. Cheap (no tower weights are hashed)."""
    modules = [model.clip.visual_projection, model.clip.text_projection]
    if model.adapter is not None:
        modules.append(model.adapter)
    h = hash_weights(hashlib.blake2b(digest_size=12), *modules)
    h.update(f"{model.pooling}:{model.temperature:.8g}".encode())
    return h.hexdigest()


@dataclass
class OperatingPoints:
    """Per (anatomy, finding) thresholds for one model and one template set (`operating_points.json`,
    written by `evaluate`, kept in the model folder or given with --thresholds)."""

    model: str  # model_fingerprint
    templates: dict
    points: dict = field(default_factory=dict)  # (anatomy or GLOBAL, finding lower case) -> OperatingPoint
    source: str = ""

    def get(self, finding: str, anatomy: str | None = None):
        return self.points.get(((anatomy or GLOBAL).lower(), finding.lower()))

    def to_json(self) -> str:
        return json.dumps({"format": OPERATING_POINTS_FORMAT, "format_version": 1, "model": self.model,
                           "templates": self.templates,
                           "points": [{"anatomy": a, "finding": f, **asdict(p)}
                                      for (a, f), p in sorted(self.points.items())]}, indent=2) + "\n"

    @classmethod
    def read(cls, path) -> "OperatingPoints":
        data = _read_json(path, "thresholds file")
        if not isinstance(data, dict) or data.get("format") != OPERATING_POINTS_FORMAT:
            raise RadCLIPError(f"'{path}' is not a RadCLIP thresholds file (written by `evaluate`)")
        points = {}
        try:
            for p in data["points"]:
                point = OperatingPoint(float(p["threshold"]), float(p["sensitivity"]), float(p["specificity"]),
                                       float(p["auc"]), int(p["positives"]), int(p["negatives"]), str(p.get("rule", "youden")))
                if not all(np.isfinite([point.threshold, point.sensitivity, point.specificity, point.auc])):
                    raise ValueError("a value is not finite")
                points[(str(p.get("anatomy") or GLOBAL).lower(), str(p["finding"]).lower())] = point
            return cls(str(data["model"]), dict(data.get("templates") or {}), points, str(path))
        except (KeyError, TypeError, ValueError) as exc:
            raise RadCLIPError(f"thresholds file '{path}' is damaged ({type(exc).__name__}: {exc})") from None


def _read_json(path, what):
    text = read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as exc:
        raise RadCLIPError(f"{what} '{path}' is not valid JSON ({exc})") from None


# --------------------------------------------------------------------------- scoring
@dataclass
class FindingScore:
    finding: str
    anatomy: str | None  # None: the whole volume (or image)
    probability: float  # P(present), uncalibrated
    cosine_present: float
    cosine_absent: float
    evidence: list | None = None  # per input slice, sums to 1 (volumes)
    slice_probability: list | None = None  # P(present) of each input slice's own embedding
    present: bool | None = None  # at the operating point; None without one
    operating_point: OperatingPoint | None = None
    slices: list | None = None  # input slices the anatomy covers (per-anatomy scores)

    def record(self) -> dict:
        out = {k: getattr(self, k) for k in ("finding", "anatomy", "probability", "cosine_present", "cosine_absent",
                                            "evidence", "slice_probability", "present", "slices")}
        out["operating_point"] = asdict(self.operating_point) if self.operating_point else None
        return out


def score_findings(model, embedding, findings, templates: FindingTemplates | None = None, anatomy: str | None = None,
                   vector: np.ndarray | None = None, covered_slices=None, thresholds: OperatingPoints | None = None
                   ) -> list[FindingScore]:
    """Each finding on its own: P(present) from `vector` (default: the volume's or image's
    embedding; pass an anatomy's vector with `anatomy`), and, for a volume, the per-slice evidence
    from its slice embeddings (for an anatomy: over `covered_slices`, the slices it covers; zero
    elsewhere). All findings at once: one product with the cached prompt pairs."""
    templates = templates or model_templates(model)
    findings = check_findings(findings)
    volume = hasattr(embedding, "slice_embeddings")  # a model.VolumeEmbedding (this module is below model.py)
    if vector is None:
        vector = embedding.embedding if volume else embedding
    vector = np.asarray(vector, np.float32)
    pairs = np.stack([prompt_pair(model, *templates.prompts(f, anatomy)) for f in findings])  # (F, 2, dim)
    cos = pairs @ vector  # (F, 2)
    probability = pair_probability(model, cos)
    evidence = slice_probability = None
    if volume:
        evidence, slice_probability = _slice_evidence(model, embedding, pairs, covered_slices)
    covered = sorted(int(c) for c in covered_slices) if volume and covered_slices is not None else None
    out = []
    for i, finding in enumerate(findings):
        score = FindingScore(finding, anatomy, float(probability[i]), float(cos[i, 0]), float(cos[i, 1]),
                             evidence[i].tolist() if evidence is not None else None,
                             slice_probability[i].tolist() if slice_probability is not None else None,
                             slices=covered)
        point = thresholds.get(finding, anatomy) if thresholds is not None else None
        if point is not None:
            score.operating_point, score.present = point, bool(score.probability >= point.threshold)
        out.append(score)
    return out


def _slice_evidence(model, embedding, pairs, covered=None):
    """(F, n) evidence (softmax over the slices of cos(present) - cos(absent), at the model's
    temperature; over the covered slices only, when given) and (F, n) per-slice P(present), for
    every input slice (skipped slices interpolated)."""
    slices = np.asarray(embedding.slice_embeddings, np.float32)  # (S, dim)
    sampled = np.asarray(embedding.sampled_slices)
    n = len(embedding.slice_weights)
    cos = np.einsum("sd,fkd->fsk", slices, pairs)  # (F, S, 2)
    probability = pair_probability(model, cos)  # (F, S)
    margin = (cos[..., 0] - cos[..., 1]).astype(np.float64)
    keep = np.ones(len(sampled), bool)
    inside = np.ones(n, bool)
    if covered is not None and len(covered):
        keep = np.isin(sampled, np.asarray(sorted(covered)))
        inside = np.isin(np.arange(n), np.asarray(sorted(covered)))
        if not keep.any():
            keep, inside = np.ones(len(sampled), bool), np.ones(n, bool)
    logits = np.where(keep, margin / model.temperature, -np.inf)
    weights = np.exp(logits - logits.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    grid = np.arange(n)
    evidence = np.stack([np.interp(grid, sampled, w) for w in weights]) * inside
    evidence /= evidence.sum(axis=1, keepdims=True)
    per_slice = np.stack([np.interp(grid, sampled, p) for p in probability])
    return evidence.astype(np.float32), per_slice.astype(np.float32)


def model_templates(model) -> FindingTemplates:
    """The model folder's templates (`finding_templates` in radclip_config.json), else the defaults."""
    return getattr(model, "finding_templates", None) or FindingTemplates()


def model_thresholds(model) -> OperatingPoints | None:
    """`operating_points.json` in the model folder, when there is one."""
    source = Path(str(getattr(model, "source", "") or ""))
    path = source / OPERATING_POINTS_FILE
    return OperatingPoints.read(path) if source.is_dir() and path.is_file() else None


def check_thresholds(thresholds: OperatingPoints | None, model, templates: FindingTemplates, findings,
                     anatomies=(None,)) -> tuple:
    """(thresholds to use or None, warnings): a file made for another model or other templates is not
    used; a finding the file lacks is reported without an operating point."""
    if thresholds is None:
        return None, []
    if thresholds.model != model_fingerprint(model):
        return None, [f"thresholds '{thresholds.source}' were chosen for another model: "
                      "probabilities only (run `evaluate` with this model to get operating points)"]
    if thresholds.templates and thresholds.templates != templates.to_dict():
        return None, [f"thresholds '{thresholds.source}' were chosen with other prompt templates: probabilities only"]
    lacking = [f"{a + ': ' if a else ''}{f}" for f in findings for a in anatomies if thresholds.get(f, a) is None]
    warnings = [f"no operating point for {', '.join(lacking)[:300]} in '{thresholds.source}': "
                "reported as a probability only"] if lacking else []
    return thresholds, warnings


# --------------------------------------------------------------------------- per anatomy, and the record
def anatomy_labelmap(labelmap, lexicon) -> tuple:
    """A segmentation's segments grouped into the lexicon's report-level anatomies (lung lobes ->
    lung): (a LabelMap with one label per anatomy, numbered in lexicon order and named after it;
    {anatomy: [segment names]}; [segment names the lexicon does not know]). Raises a one-line error
    naming the segments when the lexicon knows none of them."""
    present = {int(v) for v in np.unique(labelmap.volume.array) if v > 0}
    names = {label: labelmap.names.get(label, str(label)) for label in sorted(present)}
    groups, unknown = lexicon.group(names)
    if not groups:
        shown = ", ".join(sorted(set(names.values())))[:300]
        raise RadCLIPError(f"no segment of the segmentation is an anatomy the lexicon knows (segments: {shown}); "
                           "name them as TotalSegmentator or Slicer does, or give --lexicon")
    lut = np.zeros(max(present) + 1, np.int16)
    merged_names, segments = {}, {}
    for i, (anatomy, labels) in enumerate(groups.items(), start=1):
        lut[labels] = i
        merged_names[i] = anatomy
        segments[anatomy] = [names[label] for label in labels]
    array = labelmap.volume.array
    merged = lut[np.clip(array, 0, len(lut) - 1)] * (array > 0)
    return LabelMap(dataclasses.replace(labelmap.volume, array=merged.astype(np.int16)), merged_names), segments, unknown


def findings_record(model, embedding, findings, templates: FindingTemplates | None = None,
                    thresholds: OperatingPoints | None = None, anatomies=None, segments: dict | None = None,
                    unknown=(), warnings=()) -> dict:
    """The JSON-ready answer of `findings` (CLI, worker, Slicer): each finding on the whole volume
    and, with `anatomies` (an AnatomyEmbeddings whose names are report-level anatomies), on each
    anatomy; operating points where `thresholds` has them (probabilities only otherwise, and the
    record says so)."""
    templates = templates or model_templates(model)
    findings = check_findings(findings)
    names = list(anatomies.names.values()) if anatomies is not None else []
    thresholds, notes = check_thresholds(thresholds, model, templates, findings, [None, *names])
    record = {"model": model.source, "precision": model.precision, "templates": templates.to_dict(),
              "operating_points": thresholds.source if thresholds is not None else None,
              "warnings": [*warnings, *notes] + ([] if thresholds is not None else
                                                 ["no operating points: probabilities only (uncalibrated; "
                                                  "run `evaluate` to choose thresholds)"]),
              "findings": [s.record() for s in score_findings(model, embedding, findings, templates,
                                                             thresholds=thresholds)],
              "anatomies": [], "missing_anatomies": {}, "unknown_segments": list(unknown)}
    if hasattr(embedding, "slice_embeddings"):
        record.update(slice_axis=embedding.slice_axis, plane=embedding.plane, slices=len(embedding.slice_weights))
    if anatomies is not None:
        for label, name in anatomies.names.items():
            if label in anatomies.embeddings:
                scores = score_findings(model, embedding, findings, templates, anatomy=name,
                                        vector=anatomies.embeddings[label],
                                        covered_slices=anatomies.slices.get(label), thresholds=thresholds)
                record["anatomies"].append({"anatomy": name, "segments": (segments or {}).get(name, []),
                                            "findings": [s.record() for s in scores]})
            elif label in anatomies.missing:
                record["missing_anatomies"][name] = anatomies.missing[label]
    return record

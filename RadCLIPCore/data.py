"""Training manifests: CSV or JSONL rows of image + text (+ split, label).

Columns:
- `image`: path relative to the manifest (a volume file, DICOM folder or 2D image);
- `text`, or `region` + `modality` (+ `condition`) from which the text is built with the paper's
  pattern "[body region] [modality] with [condition]" ("Abdomen CT with prostate lesion", "Brain MRI");
- `split` (train / val / test, optional), `label` (optional);
- 2D manifests may point at a volume plus `slice` (index along `plane`, counted in the input
  array's order; plane default auto);
- anatomy-level manifests add `mask` (a label map aligned with the volume), and `text` is the report.
Bad rows (missing file, empty text, bad slice index, unknown split) are collected with their
reasons — never replaced by placeholders — and the good rows are kept.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RadCLIPError

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    image: Path
    text: str
    split: str | None = None
    label: str | None = None
    slice: int | None = None
    plane: str = "auto"
    row: int = 0  # 1-based data row in the manifest, for messages
    mask: Path | None = None  # label map of the anatomies (anatomy-level training)


@dataclass
class Manifest:
    samples: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # (row, reason)

    def split(self, name) -> list:
        return [s for s in self.samples if s.split == name]

    def reject(self, sample_or_row, reason):
        row = sample_or_row.row if isinstance(sample_or_row, Sample) else sample_or_row
        self.bad.append((row, reason))

    def report(self, limit=5) -> str | None:
        """'N bad rows skipped: row 3: ...; row 9: ...' or None."""
        if not self.bad:
            return None
        shown = "; ".join(f"row {r}: {why}" for r, why in sorted(self.bad)[:limit])
        more = f"; and {len(self.bad) - limit} more" if len(self.bad) > limit else ""
        return f"{len(self.bad)} bad manifest row(s) skipped: {shown}{more}"


def build_text(region=None, modality=None, condition=None) -> str:
    """The paper's label pattern: "[body region] [modality] with [condition]"."""
    head = " ".join(p.strip() for p in (region, modality) if p and str(p).strip())
    if not head:
        return ""
    return f"{head} with {condition.strip()}" if condition and str(condition).strip() else head


def _rows(path: Path):
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    yield n, None, f"not JSON ({exc.msg})"
                    continue
                yield n, row if isinstance(row, dict) else None, None if isinstance(row, dict) else "not an object"
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "image" not in reader.fieldnames:
            raise RadCLIPError(f"manifest '{path}' has no 'image' column (columns: {reader.fieldnames})")
        for n, row in enumerate(reader, 1):
            yield n, row, None


def read_manifest(path) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise RadCLIPError(f"manifest not found: {path}")
    if path.suffix.lower() not in (".csv", ".jsonl", ".ndjson"):
        raise RadCLIPError(f"manifest must be .csv or .jsonl, got '{path.name}'")
    try:
        rows = list(_rows(path))
    except UnicodeDecodeError:
        raise RadCLIPError(f"manifest '{path}' is not UTF-8 text") from None
    manifest = Manifest()
    for n, row, problem in rows:
        if problem:
            manifest.reject(n, problem)
            continue
        sample, why = _sample(row, path.parent, n)
        if why:
            manifest.reject(n, why)
        else:
            manifest.samples.append(sample)
    if not manifest.samples:
        raise RadCLIPError(f"manifest '{path}' has no usable rows" + (f" ({manifest.report()})" if manifest.bad else ""))
    return manifest


def _clean(value):
    return None if value is None or str(value).strip() == "" else str(value).strip()


def _sample(row: dict, root: Path, n: int):
    image = _clean(row.get("image"))
    if image is None:
        return None, "no image path"
    path = Path(image) if Path(image).is_absolute() else root / image
    if not path.exists():
        return None, f"file not found: {image}"
    text = _clean(row.get("text")) or build_text(_clean(row.get("region")), _clean(row.get("modality")),
                                                 _clean(row.get("condition")))
    if not text:
        return None, "empty text (give 'text', or 'region' and 'modality')"
    split = _clean(row.get("split"))
    if split is not None and split.lower() not in SPLITS:
        return None, f"unknown split '{split}' (use train, val or test)"
    slice_index = _clean(row.get("slice"))
    if slice_index is not None:
        try:
            slice_index = int(float(slice_index))
        except ValueError:
            return None, f"slice index '{slice_index}' is not a number"
        if slice_index < 0:
            return None, f"slice index {slice_index} is negative"
    mask = _clean(row.get("mask"))
    if mask is not None:
        mask = Path(mask) if Path(mask).is_absolute() else root / mask
        if not mask.exists():
            return None, f"mask not found: {row.get('mask')}"
    return Sample(path, text, split.lower() if split else None, _clean(row.get("label")), slice_index,
                  _clean(row.get("plane")) or "auto", n, mask), None


def write_manifest(path, rows: list[dict]):
    """Write rows (dicts) as CSV or JSONL, atomically; `image` paths relative to the manifest."""
    from .fileutil import atomic_write_text

    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    import io

    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())

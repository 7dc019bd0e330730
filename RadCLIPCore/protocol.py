"""The worker protocol, in one place: what travels between Slicer (or any client) and the worker
process `python -m RadCLIPCore serve`. Numpy only: Slicer's GUI process imports this module and
never torch.

Both directions are JSON lines. Every request is an object with an `id` (a JSON string or integer,
chosen by the client) and an `op`; every reply carries the request's `id` and an `event`.

Ops (`OPS`):
- `rank`: rank `prompts` for a volume -> `progress` events, then one `result` (the record below) or
  one `error`. Fields in `RANK_FIELDS`; each is checked when the request arrives (`check_request`).
- `findings`: score each of `findings` present vs absent (prompt ensembles; per anatomy of the
  bundled TotalSegmentator lexicon with a label map) -> `progress`, then one `result` (the
  `findings --json` record) or one `error`. The same volume fields as `rank`, plus `findings`,
  optional `templates` (an object as in radclip_config.json) and `thresholds` (a path the worker
  reads; default: the model folder's operating_points.json).
- `cancel`: stop running or queued request `id` within one slice batch; it then answers `cancelled`.
- `unload`: free models and caches (RAM and GPU) -> `unloaded`.
- `ping`: -> `pong` with the worker's versions, devices and `cpu_precision` (what `auto` runs on its CPU).
- `shutdown` (or end of input): -> `bye`, and the worker exits with status 0.

Events (`EVENTS`): `progress` (with `stage`, one of `STAGES`, and `done`/`total` while slices are
embedded); `provisional` (a `rank` of a volume with more than 32 slices to embed, at most once, before
its result): `result` is the record below computed from the `slices` evenly spaced slices embedded
first (of `total`), with no per-segment rankings; the final `result` replaces it and is the same as
a run without it. The final events `FINAL_EVENTS`, exactly one per request. An `error` has a one-line
`message` and a `code` (`ERROR_CODES`); `need_volume` means "send the voxels again".

A `rank` request names its volume one of three ways:
- `volume`: a path the worker can read (any file `read_volume` reads);
- `array`: `{"npy": path}` written by the client (both sides see the same files) or inline
  `{"dtype", "shape", "zlib_b64"}` (a worker on another machine), with `ijk_to_ras` (4x4);
- `volume_key` alone: a volume the worker holds from an earlier request with that key (the key
  changes whenever the voxels or the geometry change); otherwise `need_volume`.
A `labelmap` (same two forms, on the volume's grid, `ijk_to_ras` shared) with `segments`
({"label": "name"}) adds a ranking per segment.

The `result` record (`RESULT_KEYS`) is the `rank --json` record: `prompts` best first, each
`{"text", "probability", "cosine", "relevance"}` (relevance: one weight per input slice along
`slice_axis`, summing to 1); `slice_weights` (the pooling's weights), `slice_axis`, `plane`,
`pooling`, `most_attended_slice`, `model`, `precision` (what the model runs in: fp32, bf16, fp16 or
int8); `embedded` (False when the embedding came from the
worker's cache); with a label map also `segments` ([{"segment", "prompts"}]) and
`missing_segments` ({name: why}).
"""
from __future__ import annotations

import base64
import json
import math
import os
import stat
import zlib

import numpy as np

from .errors import RadCLIPError

# ops
RANK, FINDINGS, CANCEL, UNLOAD, PING, SHUTDOWN = "rank", "findings", "cancel", "unload", "ping", "shutdown"
OPS = (RANK, FINDINGS, CANCEL, UNLOAD, PING, SHUTDOWN)
COMPUTE_OPS = (RANK, FINDINGS, UNLOAD)  # run one at a time, in order, on the worker's compute thread

# events
PROGRESS, PROVISIONAL, RESULT, ERROR, CANCELLED, UNLOADED, PONG, BYE = (
    "progress", "provisional", "result", "error", "cancelled", "unloaded", "pong", "bye")
EVENTS = (PROGRESS, PROVISIONAL, RESULT, ERROR, CANCELLED, UNLOADED, PONG, BYE)
FINAL_EVENTS = (RESULT, ERROR, CANCELLED, UNLOADED, PONG, BYE)  # one per request

# progress stages, in order
LOADING_MODEL, EMBEDDING_SLICES, RANKING_PROMPTS, SCORING_FINDINGS = (
    "loading model", "embedding slices", "ranking prompts", "scoring findings")
STAGES = (LOADING_MODEL, EMBEDDING_SLICES, RANKING_PROMPTS, SCORING_FINDINGS)

# error codes
NEED_VOLUME, BAD_REQUEST, FAILED, WORKER_DIED = "need_volume", "bad_request", "failed", "worker_died"
ERROR_CODES = (NEED_VOLUME, BAD_REQUEST, FAILED, WORKER_DIED)

RESULT_KEYS = ("prompts", "slice_weights", "slice_axis", "plane", "most_attended_slice", "pooling", "model", "precision",
               "embedded", "segments", "missing_segments")
PLANES = ("auto", "axial", "coronal", "sagittal")
# the bounds a request is held to (a prompt is at most 77 tokens anyway; a volume at most 2 GiB)
MAX_PROMPTS = 1000
MAX_PROMPT_CHARS = 2000
MAX_TEXT_CHARS = 4096  # model, device, paths, keys, segment names
MAX_SEGMENTS = 1024
MAX_SLICES = 100_000
MAX_BATCH = 4096
MAX_VOXEL_BYTES = 2 << 30
# each field of a rank or findings request: (types, required); values are checked in check_request
VOLUME_FIELDS = {
    "model": ((str,), False), "device": ((str,), False),
    "precision": ((str,), False), "offline": ((bool,), False), "config": ((str,), False),
    "pooling": ((str,), False), "plane": ((str,), False), "max_slices": ((int,), False),
    "batch_size": ((int,), False), "min_patches": ((int, float), False), "volume": ((str,), False),
    "volume_key": ((str,), False), "array": ((dict,), False), "ijk_to_ras": ((list,), False),
    "labelmap": ((dict,), False), "segments": ((dict,), False),
}
RANK_FIELDS = {"prompts": ((list,), True), **VOLUME_FIELDS}
FINDINGS_FIELDS = {"findings": ((list,), True), "templates": ((dict,), False), "thresholds": ((str,), False),
                   **VOLUME_FIELDS}
MAX_FINDINGS = 500


class ProtocolError(RadCLIPError):
    """A request that breaks the protocol: answered with an `error` (code `bad_request`)."""

    code = BAD_REQUEST


def check_id(value):
    """A request id: a JSON string (at most 256 characters) or integer; None when absent."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)) or \
            (isinstance(value, str) and len(value) <= 256):
        return value
    raise ProtocolError("'id' must be a string (at most 256 characters) or an integer")


def parse_request(line: str) -> dict:
    """One request line -> the request object, or ProtocolError (then the reply's id is the one
    found in the line, when it is a valid id)."""
    try:
        request = json.loads(line, parse_constant=_no_constant)
    except ValueError as exc:
        raise ProtocolError(f"bad request: not JSON ({str(exc)[:100]})") from None
    if not isinstance(request, dict):
        raise ProtocolError("bad request: a request is an object with 'id' and 'op'")
    check_id(request.get("id"))
    if request.get("op") not in OPS:
        raise ProtocolError(f"unknown op {str(request.get('op'))[:40]!r} (one of {', '.join(OPS)})")
    return request


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def check_request(request: dict) -> dict:
    """The fields of a `rank` or `findings` request, each of the right type and within its bounds
    (ProtocolError otherwise, naming the field). Unknown fields are refused too: a typo must not be
    ignored."""
    op = request.get("op", RANK if "prompts" in request else FINDINGS)
    fields = RANK_FIELDS if op == RANK else FINDINGS_FIELDS
    unknown = sorted(set(request) - set(fields) - {"id", "op"})
    if unknown:
        raise ProtocolError(f"unknown field(s) {', '.join(unknown)[:200]} in a {op} request")
    for name, (types, required) in fields.items():
        value = request.get(name)
        if value is None:
            if required:
                raise ProtocolError(f"a rank request needs '{name}'")
            continue
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise ProtocolError(f"'{name}' must be {' or '.join(t.__name__ for t in types)}")
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ProtocolError(f"'{name}' is longer than {MAX_TEXT_CHARS} characters")
    texts, most = (request["prompts"], MAX_PROMPTS) if op == RANK else (request["findings"], MAX_FINDINGS)
    if not texts or len(texts) > most:
        raise ProtocolError(f"'{'prompts' if op == RANK else 'findings'}' must hold 1 to {most} texts")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise ProtocolError(f"every {'prompt' if op == RANK else 'finding'} must be a non-empty text")
        if len(text) > MAX_PROMPT_CHARS:
            raise ProtocolError(f"a text is longer than {MAX_PROMPT_CHARS} characters "
                                "(the text encoder reads 77 tokens)")
    _in_range(request, "max_slices", 0, MAX_SLICES)
    _in_range(request, "batch_size", 1, MAX_BATCH)
    _in_range(request, "min_patches", 0, 1e6)
    if request.get("plane") is not None and request["plane"] not in PLANES:
        raise ProtocolError(f"'plane' must be one of {', '.join(PLANES)}")
    if request.get("ijk_to_ras") is not None:
        ijk_to_ras(request["ijk_to_ras"])
    segments = request.get("segments")
    if segments is not None:
        if len(segments) > MAX_SEGMENTS:
            raise ProtocolError(f"at most {MAX_SEGMENTS} segments")
        for label, name in segments.items():
            label = str(label)
            if not label.isdigit() or not 0 < int(label) < 2 ** 31 or not isinstance(name, str) \
                    or len(name) > MAX_TEXT_CHARS:
                raise ProtocolError("'segments' maps positive integer labels (as text) to names")
    if request.get("labelmap") is not None and request.get("ijk_to_ras") is None:
        raise ProtocolError("'labelmap' needs 'ijk_to_ras' (the 4x4 IJK-to-RAS matrix of the volume's grid)")
    return request


def _in_range(request, name, low, high):
    value = request.get(name)
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
        raise ProtocolError(f"'{name}' must be between {low} and {high}")


def ijk_to_ras(value) -> np.ndarray:
    """A 4x4 matrix of finite numbers (nested lists), or ProtocolError."""
    try:
        matrix = np.array(value, dtype=np.float64)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ProtocolError("'ijk_to_ras' must be a 4x4 matrix of finite numbers")
    return matrix


def encode_array(array: np.ndarray) -> dict:
    """Inline voxels: dtype, shape and the zlib-compressed C-order bytes in base64."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "zlib_b64": base64.b64encode(zlib.compress(array.tobytes(), 1)).decode("ascii")}


def decode_array(spec) -> np.ndarray:
    """The array of a request's `array` or `labelmap` field (inline, or a .npy file). The declared
    size is checked before anything is allocated, and decompression stops at it."""
    if not isinstance(spec, dict):
        raise ProtocolError("voxels must be an object with 'npy', or 'dtype', 'shape' and 'zlib_b64'")
    if "npy" in spec:
        return _read_npy(spec["npy"])
    try:
        dtype, shape = _declared(spec.get("dtype"), spec.get("shape"))
        expected = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        data = spec["zlib_b64"]
        if not isinstance(data, str):
            raise TypeError("zlib_b64 must be text")
        unzip = zlib.decompressobj()
        raw = unzip.decompress(base64.b64decode(data, validate=True), expected + 1)  # never past the bound
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise ProtocolError(f"bad inline voxels ({type(exc).__name__}: {str(exc)[:200]})") from None
    if len(raw) != expected or not unzip.eof:
        raise ProtocolError(f"inline voxels do not match dtype {dtype} and shape {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _declared(dtype, shape) -> tuple:
    dtype = np.dtype(dtype) if isinstance(dtype, str) else None
    if dtype is None or dtype.kind not in "biuf" or dtype.hasobject:
        raise ValueError("dtype must be a numeric numpy dtype (e.g. '<i2', '<f4')")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape):
        raise ValueError("shape must be 1 to 4 positive integers")
    if dtype.itemsize * math.prod(shape) > MAX_VOXEL_BYTES:
        raise ValueError(f"declared size above {MAX_VOXEL_BYTES >> 30} GiB")
    return dtype, tuple(shape)


def _read_npy(path) -> np.ndarray:
    """A `.npy` file the client wrote: a regular file (never a FIFO or device: reading one would
    hang), its header checked before the data is read."""
    if not isinstance(path, str) or not path:
        raise ProtocolError("'npy' must be a path")
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise ProtocolError(f"the voxels file '{path}' is not a regular file")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            _declared(dtype.str, list(shape))
            if dtype.itemsize * math.prod(shape) > info.st_size:
                raise ValueError("the file is shorter than its header says")
            array = np.fromfile(f, dtype=dtype, count=math.prod(shape))
        return array.reshape(shape, order="F" if fortran else "C")
    except ProtocolError:
        raise
    except (OSError, ValueError) as exc:
        raise ProtocolError(f"cannot read the voxels file '{path}': {str(exc)[:200]}") from None

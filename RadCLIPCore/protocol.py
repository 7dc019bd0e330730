"""What travels between Slicer and the worker process, in one place (numpy only: Slicer's GUI
process imports this module and never torch).

Voxels travel as a `.npy` file the client wrote (`{"npy": path}`, when both sides see the same
files) or inline (`{"dtype", "shape", "zlib_b64"}`, for a worker on another machine).
"""
from __future__ import annotations

import base64
import zlib

import numpy as np

from .errors import RadCLIPError

# events that end a request (one per request)
FINAL_EVENTS = ("result", "error", "cancelled", "unloaded", "pong", "bye")


def encode_array(array: np.ndarray) -> dict:
    """Inline voxels: dtype, shape and the zlib-compressed C-order bytes in base64."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "zlib_b64": base64.b64encode(zlib.compress(array.tobytes(), 1)).decode("ascii")}


def decode_array(spec) -> np.ndarray:
    """The array of a request's `array` or `labelmap` field (inline, or a .npy file)."""
    if not isinstance(spec, dict):
        raise RadCLIPError("voxels must be an object with 'npy', or 'dtype', 'shape' and 'zlib_b64'")
    if "npy" in spec:
        try:
            return np.load(spec["npy"], allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RadCLIPError(f"cannot read the voxels file '{spec['npy']}': {exc}") from None
    try:
        dtype, shape = np.dtype(spec["dtype"]), tuple(int(n) for n in spec["shape"])
        raw = zlib.decompress(base64.b64decode(spec["zlib_b64"], validate=True))
    except (KeyError, TypeError, ValueError, zlib.error) as exc:
        raise RadCLIPError(f"bad inline voxels ({type(exc).__name__}: {exc})") from None
    if dtype.hasobject or len(raw) != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
        raise RadCLIPError(f"inline voxels do not match dtype {dtype} and shape {shape}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)

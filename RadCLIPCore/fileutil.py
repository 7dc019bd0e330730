"""Atomic writes: a crash or a kill mid-write never leaves a half-written file or folder behind."""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import RadCLIPError


@contextmanager
def atomic_path(target, suffix=""):
    """Yield a temporary path beside `target`; on success it is renamed onto `target`.

    Works for a file or a folder written at the yielded path. The rename is atomic on POSIX for
    files; for an existing folder the old one is moved aside first and removed only after the new
    one is in place, so a reader always finds a complete folder (the old or the new one).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    work = tmp / ("payload" + suffix)
    try:
        yield work
        if work.is_dir():
            _swap_dir(work, target)
        else:
            with open(work, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(work, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_dir(new, target):
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(target, data: bytes):
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target, text: str):
    atomic_write_bytes(target, text.encode("utf-8"))


def check_output_dir(path, what="output folder") -> Path:
    """Create `path` if needed and prove we can write there — before any long computation runs.

    Raises RadCLIPError naming the folder when it cannot be created (a parent is a file, no
    permission, read-only disk) or cannot be written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".radclip-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise RadCLIPError(f"{what} '{path}' is a file, not a folder") from None
    except NotADirectoryError:
        raise RadCLIPError(f"{what} '{path}' cannot be created: a part of its path is a file") from None
    except OSError as exc:
        raise RadCLIPError(f"{what} '{path}' is not writable ({exc.strerror or exc})") from None
    return path


def check_output_dir_possible(path, what="output folder") -> Path:
    """`path` is a writable folder, or can be created as one — checked without creating anything
    (a bad input found later must leave nothing behind): no part of it is a file, and its nearest
    existing ancestor is a writable folder."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise RadCLIPError(f"{what} '{path}' is a file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise RadCLIPError(f"{what} '{path}' is not writable")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RadCLIPError(f"{what} '{path}' cannot be created: a part of its path is a file")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RadCLIPError(f"{what} '{path}' cannot be created: '{ancestor}' is not writable")
    return path


def check_output_file(path, what="output file") -> Path:
    """The folder that will receive `path` exists (or can be made) and is writable, and `path`
    itself is not a folder; checked before the work that produces the file."""
    path = Path(path)
    if path.is_dir():
        raise RadCLIPError(f"{what} '{path}' is a folder; give a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), f"the folder of the {what}")
    return path


def read_text(path, what: str, hint: str = "") -> str:
    """A user's UTF-8 text file (a BOM is dropped), or one line naming `what` and the problem
    (missing, a folder, not UTF-8, unreadable); `hint` says what the file should be."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise RadCLIPError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise RadCLIPError(f"{what} '{path}' is a folder" + (f"; give {hint}" if hint else "")) from None
    except UnicodeDecodeError as exc:
        raise RadCLIPError(f"{what} '{path}' is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise RadCLIPError(f"cannot read {what} '{path}': {exc.strerror or exc}") from None


def read_json(path, what: str):
    """The JSON value in `path`. `what` names it in the one-line error (e.g. "CLIP config 'x.json'")
    when the file cannot be read or is not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise RadCLIPError(f"cannot read {what}: {exc.strerror or exc}") from None
    except ValueError as exc:  # bad JSON, or not UTF-8
        raise RadCLIPError(f"{what} is not valid JSON ({exc})") from None

"""What every command shares: one-line usage errors, argument types, progress bars, and the
guard that turns exceptions into one `error:` line and an exit status.

Exit statuses: 0 success; 2 a user error (`RadCLIPError` or a usage error), one `error:` line;
130 interrupted; 1 an unexpected error (our bug), one line (RADCLIP_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager

from ..errors import RadCLIPError
from ..choices import CT_WINDOWS, DEFAULT_WINDOWS, GEOMETRIES, POLICIES

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error:` line and exit 2, like every other user error."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {self.prog}: {' '.join(message.split())} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@contextmanager
def progress_bar(desc: str, unit: str):
    """A `progress(done, total)` callback drawing a tqdm bar on stderr (hidden when not a terminal)."""
    from tqdm.auto import tqdm

    bar = None

    def progress(done, total):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit=unit, leave=False, disable=None)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


class _OneLine(logging.Formatter):
    def format(self, record):
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}"


def guarded(run) -> int:
    """Run `run()` (returns an exit status) with one-line errors and warnings on stderr.

    RadCLIPError -> `error: ...`, exit 2; Ctrl-C -> exit 130; anything else -> one line, exit 1
    (RADCLIP_DEBUG=1 shows the traceback). Used by the CLI and the Training entry points.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("RadCLIPCore")
    saved = logger.handlers[:], logger.level, logger.propagate  # may be called in-process
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if os.environ.get("RADCLIP_VERBOSE") else logging.WARNING)
    logger.propagate = False
    # transformers' warnings and the hub's progress bars off, without importing transformers here
    # (seconds of start-up): read when it is first imported; set directly if it already is
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        return run()
    except RadCLIPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an unforeseen input: one line, traceback on request
        if os.environ.get("RADCLIP_DEBUG"):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"error: unexpected {type(exc).__name__}: {first} (set RADCLIP_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 1
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved


def add_preprocessing_options(p, default: str):
    """--intensity, --windows, --percentiles, --geometry (README: How volumes are processed)."""
    g = p.add_argument_group(f"preprocessing (default: {default})")
    g.add_argument("--intensity", choices=POLICIES, help="intensity policy (README: How volumes are processed)")
    g.add_argument("--windows", type=_windows, metavar="W[,W,W]",
                   help=f"CT windows, 1 or 3 (three become the channels): {', '.join(CT_WINDOWS)} or LEVEL/WIDTH "
                        f"in HU; default {','.join(DEFAULT_WINDOWS)}")
    g.add_argument("--percentiles", type=_percentiles, metavar="LOW,HIGH", help="the percentile window (0.5,99.5)")
    g.add_argument("--geometry", choices=GEOMETRIES,
                   help="letterbox (physical aspect kept, padded) or crop (CLIP's shortest-edge resize and centre crop)")


def _windows(text: str) -> tuple:
    out = []
    for item in text.split(","):
        item = item.strip()
        if "/" in item:
            try:
                level, width = (float(v) for v in item.split("/"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"'{item}' is not LEVEL/WIDTH in HU") from None
            out.append((level, width))
        else:
            out.append(item)
    return tuple(out)


def _percentiles(text: str) -> tuple:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LOW,HIGH (e.g. 0.5,99.5)") from None
    return low, high

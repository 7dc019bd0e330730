"""`python -m RadCLIPCore serve`: the persistent worker process behind the Slicer module.

JSON lines on stdin, JSON lines on stdout, logs on stderr. Every request is an object with an
`id` and an `op`; every reply carries the request's `id` and an `event`:

- `{"id": 1, "op": "rank", ...}` (fields in `RadCLIPCore.worker`) -> `progress` events, then one
  `result` (the `rank --json` record plus segments) or one `error` with a one-line `message`;
- `{"id": 1, "op": "cancel"}` stops running (or queued) request 1 within one slice batch; request 1
  then answers `cancelled`;
- `{"id": 2, "op": "unload"}` frees models and caches (RAM and GPU) -> `unloaded`;
- `{"id": 3, "op": "ping"}` -> `pong` with the worker's versions and devices;
- `{"id": 4, "op": "shutdown"}` (or end of input) -> `bye`, exit status 0.

Requests run one at a time, in order, on a compute thread; this thread only reads stdin, so a
cancel is seen while a request computes. A bad request gets an `error` event; the worker lives on.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading

from ..errors import RadCLIPError
from ..worker import Cancelled, WorkerSession

log = logging.getLogger("RadCLIPCore")
COMPUTE_OPS = ("rank", "unload")


class _Protocol:
    """Writes events as single JSON lines; both threads share it."""

    def __init__(self, stream):
        self._stream, self._lock = stream, threading.Lock()

    def emit(self, event: dict):
        line = json.dumps(event, allow_nan=False)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


def _protocol_stdout():
    """The real stdout for the protocol; everything else that prints (libraries, C code) goes to
    stderr, so nothing can corrupt the JSON lines."""
    stream = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return stream


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, RadCLIPError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory: use fewer slices (max_slices), a smaller batch, or a machine with more memory"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(exc).__name__}: {first}"


def ping_info() -> dict:
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": devices, "gpus": gpus,
            "pid": os.getpid()}


def serve(stdin=None, stdout=None) -> int:
    stdin = stdin or sys.stdin
    protocol = _Protocol(stdout or _protocol_stdout())
    session = WorkerSession()
    jobs: queue.Queue = queue.Queue()
    cancelled: set = set()
    state = {"running": None}

    def compute():
        while True:
            request = jobs.get()
            if request is None:
                return
            rid = request.get("id")
            state["running"] = rid

            def emit(event, rid=rid):
                protocol.emit({"id": rid, **event})

            try:
                if rid in cancelled:
                    raise Cancelled()
                if request["op"] == "rank":
                    emit({"event": "result", "result": session.rank_request(request, emit, lambda: rid in cancelled)})
                else:
                    session.unload()
                    emit({"event": "unloaded"})
            except Cancelled:
                emit({"event": "cancelled"})
            except BaseException as exc:  # a bad request never kills the worker
                if not isinstance(exc, RadCLIPError):
                    log.exception("request %s failed", rid)
                emit({"event": "error", "message": _one_line(exc), "code": getattr(exc, "code", None)})
            finally:
                cancelled.discard(rid)
                state["running"] = None

    worker = threading.Thread(target=compute, name="radclip-compute", daemon=True)
    worker.start()
    bye_id = None
    try:
        for line in stdin:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                if not isinstance(request, dict) or "op" not in request:
                    raise ValueError("a request is an object with 'id' and 'op'")
            except ValueError as exc:
                protocol.emit({"id": None, "event": "error", "message": f"bad request: {exc}"})
                continue
            op, rid = request["op"], request.get("id")
            if op in COMPUTE_OPS:
                jobs.put(request)
            elif op == "cancel":
                cancelled.add(rid)  # seen by the running request's next slice batch, or when dequeued
            elif op == "ping":
                protocol.emit({"id": rid, "event": "pong", **ping_info()})
            elif op == "shutdown":
                bye_id = rid
                break
            else:
                protocol.emit({"id": rid, "event": "error",
                               "message": f"unknown op '{op}' (rank, cancel, unload, ping, shutdown)"})
    finally:  # shutdown or end of input: cancel what runs and what waits, then stop
        cancelled.update(r.get("id") for r in list(jobs.queue) if r is not None)
        if state["running"] is not None:
            cancelled.add(state["running"])
        jobs.put(None)
        worker.join()
    protocol.emit({"id": bye_id, "event": "bye"})
    return 0

"""`python -m RadCLIPCore serve`: the persistent worker process behind the Slicer module.

JSON lines on stdin, JSON lines on stdout, logs on stderr. Every request is an object with an
`id` and an `op`; every reply carries the request's `id` and an `event`:

`id` and an `op`; every reply carries the request's `id` and an `event`. The ops, events, fields
and the result record are defined once, in `RadCLIPCore.protocol`.

Requests run one at a time, in order, on a compute thread; this thread only reads stdin, so a
cancel is seen while a request computes. Each request is checked when it arrives (types and
bounds of every field): a bad one gets an `error` event at once, and the worker lives on.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading

from .. import protocol as P
from ..errors import RadCLIPError

log = logging.getLogger("RadCLIPCore")


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

    from ..encoders import auto_cpu_precision

    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "devices": devices, "gpus": gpus,
            "pid": os.getpid(), "cpu_precision": auto_cpu_precision()}


def serve(stdin=None, stdout=None) -> int:
    from ..worker import Cancelled, WorkerSession

    stdin = stdin or sys.stdin
    protocol = _Protocol(stdout or _protocol_stdout())
    session = WorkerSession()
    jobs: queue.Queue = queue.Queue()
    cancelled: set = set()
    pending: set = set()  # ids queued or running: a cancel applies only to these (never to a later reuse of an id)
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
                if request["op"] in (P.RANK, P.FINDINGS):
                    compute_op = session.rank_request if request["op"] == P.RANK else session.findings_request
                    emit({"event": P.RESULT, "result": compute_op(request, emit, lambda: rid in cancelled)})
                else:
                    session.unload()
                    emit({"event": P.UNLOADED})
            except Cancelled:
                emit({"event": P.CANCELLED})
            except BaseException as exc:  # a bad request never kills the worker
                if not isinstance(exc, RadCLIPError):
                    log.exception("request %s failed", rid)
                emit({"event": P.ERROR, "message": _one_line(exc), "code": getattr(exc, "code", P.FAILED)})
            finally:
                pending.discard(rid)
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
                request = P.parse_request(line)
                if request["op"] in (P.RANK, P.FINDINGS):
                    P.check_request(request)
            except P.ProtocolError as exc:
                protocol.emit({"id": _valid_id(line), "event": P.ERROR, "message": str(exc), "code": exc.code})
                continue
            op, rid = request["op"], request.get("id")
            if op in P.COMPUTE_OPS:
                pending.add(rid)
                jobs.put(request)
            elif op == P.CANCEL:
                if rid in pending:  # seen by the running request's next slice batch, or when dequeued
                    cancelled.add(rid)
            elif op == P.PING:
                protocol.emit({"id": rid, "event": P.PONG, **ping_info()})
            elif op == P.SHUTDOWN:
                bye_id = rid
                break
    finally:  # shutdown or end of input: cancel what runs and what waits, then stop
        cancelled.update(r.get("id") for r in list(jobs.queue) if r is not None)
        if state["running"] is not None:
            cancelled.add(state["running"])
        jobs.put(None)
        worker.join()
    protocol.emit({"id": bye_id, "event": P.BYE})
    return 0


def _valid_id(line: str):
    """The id of a refused request, when the line is an object with a valid id (else None)."""
    try:
        return P.check_id(json.loads(line, parse_constant=float).get("id"))
    except (ValueError, AttributeError, RadCLIPError):
        return None

"""The Slicer side of the worker protocol (no Qt, no MRML): start, talk to and restart the worker.

The worker (`python -m RadCLIPCore serve`, see RadCLIPCore/commands/serve.py) runs outside
Slicer's process: no GIL contention with Slicer's main thread, a real cancel, crashes and
out-of-memory stay outside Slicer, and GPU memory returns when it exits. Its command is a setting:
by default Slicer's own Python (`PythonSlicer`), or e.g. `ssh gpu-box /opt/venv/bin/python -m
RadCLIPCore serve` for a GPU server that shares no files with this machine (transport "inline":
the voxels travel inside the protocol).

The GUI thread never waits: `request(...)` queues the request for a sender thread (which writes
the voxels file, or compresses the voxels for the inline transport, and writes the line), a reader
thread moves the worker's lines into a queue, and `poll(ids)` returns the events of those requests
(events of other requests wait for whoever asked for them: the panel and a console script never
take each other's results); `wait()` blocks (scripts, tests). `stop()` returns at once: a reaper
thread asks the worker to exit and kills it if it does not. A cancel while the worker loads a
model (which it cannot interrupt) kills the worker at once. When the worker dies, every pending
request gets one `error` event saying so, and the next request starts a fresh worker. Every file a
request writes is deleted when the request ends.

The messages themselves are defined once, in `RadCLIPCore.protocol`.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import queue
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from RadCLIPCore import protocol as P

CORE_PARENT = next((str(p) for p in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parents[2])
                    if (p / "RadCLIPCore").is_dir()), None)  # bundled beside the module, or the source checkout


def default_command(python: str | None = None) -> list:
    """Slicer's own Python (PythonSlicer inside Slicer; this interpreter elsewhere) running the worker."""
    return [python or sys.executable, "-m", "RadCLIPCore", "serve"]


class WorkerError(RuntimeError):
    """The worker could not be started or stopped unexpectedly."""


class WorkerClient:
    def __init__(self, command=None, transport: str = "file", env: dict | None = None):
        """`command`: a list, or a string split like a shell would (default: `default_command()`).
        `transport`: "file" (voxels go through a temporary .npy file; the worker sees this machine's
        files) or "inline" (voxels inside the request; for a worker on another machine)."""
        if transport not in ("file", "inline"):
            raise ValueError("transport must be 'file' or 'inline'")
        self.command = shlex.split(command) if isinstance(command, str) else list(command or default_command())
        self.transport = transport
        self.env = env
        self._process = None
        self._events: queue.Queue = queue.Queue()  # raw lines from the reader thread
        self._inbox: dict = {}  # id -> deque of events not yet taken by poll/wait
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self._files = itertools.count(1)
        self._pending: dict = {}  # id -> the request (kept to resend voxels on `need_volume`)
        self._owner: dict = {}  # id -> the worker process it was sent to (its death ends only those)
        self._file_users: dict = {}  # voxels file -> ids of pending requests that name it
        self._stage: dict = {}  # id -> the last progress stage it reported
        self._request_files: dict = {}  # id -> files written for it alone (deleted when it ends)
        self._killed_to_cancel: set = set()  # ids whose cancel killed the worker (they end `cancelled`)
        self._known_volumes: set = set()  # volume keys this worker process holds
        self._resend: dict = {}  # id -> (voxels, key) of a request that sent the key alone
        self._volume_files: dict = {}  # volume key -> .npy written for the "file" transport
        self._outbox = None  # the current worker's sender queue
        self._tmp = tempfile.TemporaryDirectory(prefix="radclip-worker-")
        self.log_path = Path(self._tmp.name) / "worker.log"
        self.deaths = 0

    # ------------------------------------------------------------------ process
    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self):
        return self._process.pid if self.running else None

    def start(self):
        if self.running:
            return
        env = dict(os.environ if self.env is None else self.env)
        if CORE_PARENT:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [CORE_PARENT, env.get("PYTHONPATH")]))
        env.setdefault("PYTHONUNBUFFERED", "1")
        log = open(self.log_path, "ab")
        # its own process group: PythonSlicer is a launcher that starts the real Python as a child,
        # so stopping the worker means stopping the whole tree (see kill())
        group = ({"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
                 if os.name == "nt" else {"start_new_session": True})
        try:
            self._process = subprocess.Popen(self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=log, env=env, cwd=self._tmp.name, **group)
        except OSError as exc:
            raise WorkerError(f"cannot start the RadCLIP worker ({' '.join(self.command)}): {exc}") from None
        finally:
            log.close()
        self._known_volumes.clear()
        if self._outbox is not None:  # a dead worker's sender thread: let it end
            self._outbox.put(None)
        self._outbox = queue.Queue()
        threading.Thread(target=self._read, args=(self._process,), name="radclip-worker-reader", daemon=True).start()
        threading.Thread(target=self._write, args=(self._process, self._outbox), name="radclip-worker-sender",
                         daemon=True).start()

    def _read(self, process):
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not a protocol line (the worker keeps its own output on stderr)
            if isinstance(event, dict):
                self._events.put(event)
        process.wait()
        self._events.put({"id": None, "event": "_exit", "process": process, "returncode": process.returncode})

    def _write(self, process, outbox):
        """Sender thread: voxels to a file or inline, then the request line (never on the GUI thread)."""
        while True:
            item = outbox.get()
            if item is None:
                return
            request, voxels = item
            try:
                for name, (array, key) in voxels.items():
                    request[name] = self._array_field(array, key, request["id"])
                process.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
                process.stdin.flush()
            except (OSError, ValueError):  # a dead worker: its exit is reported by the reader
                pass

    def stop(self, timeout: float = 10.0, then=None):
        """Stop the worker without waiting for it: pending requests end `cancelled` now; a reaper
        thread asks the worker to shut down and kills it if it has not within `timeout` seconds
        (e.g. while it loads a model, which it cannot interrupt), then calls `then()`."""
        process, outbox = self._process, self._outbox
        if process is None:
            if then is not None:
                then()
            return
        self._process, self._outbox = None, None
        with self._lock:
            for rid in sorted(self._pending, key=str):
                self._deliver({"id": rid, "event": P.CANCELLED})
                self._end(rid)
        if process.poll() is None:
            outbox.put(({"id": next(self._ids), "op": P.SHUTDOWN}, {}))
            outbox.put(None)
        else:
            outbox.put(None)
        threading.Thread(target=self._reap, args=(process, timeout, then), name="radclip-worker-reaper",
                         daemon=True).start()

    @staticmethod
    def _reap(process, timeout, then):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            process.wait()
        if then is not None:
            then()

    def kill(self):
        """Stop the worker and its children at once (the last resort; pending requests get an error)."""
        if self._process is not None:
            _kill_tree(self._process)

    def close(self):
        """Stop the worker (killed if it has not exited within 2 s) and then delete every file it was
        given; returns at once."""
        self.stop(timeout=2.0, then=self._tmp.cleanup)

    # ------------------------------------------------------------------ requests
    def _send(self, request: dict, voxels: dict | None = None):
        if self._outbox is not None:
            self._outbox.put((request, voxels or {}))

    def request(self, op: str, **fields) -> int:
        """Send a request (starting the worker if needed); returns its id at once."""
        return self._submit(op, fields, {})

    def _submit(self, op, fields, voxels) -> int:
        self.start()
        rid = next(self._ids)
        request = {"id": rid, "op": op, **fields}
        with self._lock:
            self._pending[rid] = request
            self._owner[rid] = self._process
            self._inbox.setdefault(rid, collections.deque())
        self._send(request, voxels)
        return rid

    def send_findings(self, findings, array=None, ijk_to_ras=None, volume_key=None, path=None, labelmap=None,
                      segments=None, **options) -> int:
        """A `findings` request: each finding scored on the volume (and on each anatomy of a label
        map); the voxels travel as for `send_rank`."""
        return self._send_volume(P.FINDINGS, dict(options, findings=list(findings)), array, ijk_to_ras, volume_key,
                                 path, labelmap, segments)

    def send_rank(self, prompts, array=None, ijk_to_ras=None, volume_key=None, path=None, labelmap=None,
                  segments=None, **options) -> int:
        """A `rank` request for voxels `array` (k, j, i) with their 4x4 IJK-to-RAS matrix, or a file
        `path`. `volume_key` (changes when voxels or geometry change) lets the worker reuse what it
        holds: the voxels are sent only when it does not hold them. The arrays are copied here (the
        caller's may be views of a Slicer volume); files and compression happen on the sender thread."""
        return self._send_volume(P.RANK, dict(options, prompts=list(prompts)), array, ijk_to_ras, volume_key, path,
                                 labelmap, segments)

    def _send_volume(self, op, fields, array, ijk_to_ras, volume_key, path, labelmap, segments) -> int:
        voxels = {}
        if path is not None:
            fields["volume"] = str(path)
        else:
            fields["ijk_to_ras"] = np.asarray(ijk_to_ras, dtype=float).tolist()
            if volume_key is not None:
                fields["volume_key"] = volume_key
            if volume_key is None or volume_key not in self._known_volumes or not self.running:
                voxels["array"] = (np.array(array, copy=True), volume_key)
        if labelmap is not None:
            voxels["labelmap"] = (np.array(labelmap, copy=True), None)
            fields["segments"] = {str(k): v for k, v in (segments or {}).items()}
        keep = None if path is not None or "array" in voxels else (np.array(array, copy=True), volume_key)
        rid = self._submit(op, fields, voxels)
        if keep is not None:
            self._resend[rid] = keep  # in case the worker no longer holds it
        return rid

    def _array_field(self, array, key, rid) -> dict:
        """Sender thread: the voxels as a protocol field. A volume's file (by key) is kept for the
        next request; a request's own file (label maps, unkeyed volumes) goes when it ends."""
        if self.transport == "inline":
            return P.encode_array(np.asarray(array))
        with self._lock:
            if key is not None and key in self._volume_files:
                self._file_users.setdefault(self._volume_files[key], set()).add(rid)
                return {"npy": self._volume_files[key]}
        path = Path(self._tmp.name) / f"voxels-{next(self._files)}.npy"
        np.save(path, np.asarray(array), allow_pickle=False)
        with self._lock:
            if key is not None:  # one current volume file; older ones go once no pending request names them
                old = list(self._volume_files.values())
                self._volume_files = {key: str(path)}
                self._file_users.setdefault(str(path), set()).add(rid)
                for file in old:
                    self._release(file)
            elif rid in self._pending:
                self._request_files.setdefault(rid, []).append(path)
            else:  # it ended before the file was written
                path.unlink(missing_ok=True)
        return {"npy": str(path)}

    def _release(self, file):
        """Delete a volume file no longer current once no pending request names it."""
        if not self._file_users.get(file) and file not in self._volume_files.values():
            self._file_users.pop(file, None)
            Path(file).unlink(missing_ok=True)

    def cancel(self, rid: int):
        """Stop request `rid` within one slice batch; it then answers `cancelled`. While the worker
        loads a model (a step it cannot interrupt) the worker is killed at once instead."""
        if not self.running or rid not in self._pending:
            return
        self._drain()
        if self._stage.get(rid) == P.LOADING_MODEL:
            self._killed_to_cancel.add(rid)
            _kill_tree(self._process)
        else:
            self._send({"id": rid, "op": P.CANCEL})

    # ------------------------------------------------------------------ events
    def poll(self, ids=None) -> list:
        """Events that arrived since the last call for the requests `ids` (every request when None),
        never blocking. A dead worker turns into one `error` event per pending request."""
        self._drain()
        events = []
        with self._lock:
            for rid in (list(self._inbox) if ids is None else ids):
                box = self._inbox.get(rid)
                while box:
                    events.append(box.popleft())
                if box is not None and rid not in self._pending:
                    del self._inbox[rid]
        return events

    def wait(self, rid: int, timeout: float = 600.0, on_event=None) -> dict:
        """Block until request `rid` ends; returns its final event. `on_event` sees each of its events."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.poll([rid]):
                if on_event is not None:
                    on_event(event)
                if event.get("event") in P.FINAL_EVENTS:
                    return event
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the RadCLIP worker did not answer request {rid} in {timeout:.0f} s")
            try:
                event = self._events.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                continue
            with self._lock:
                self._handle(event)

    def _drain(self):
        with self._lock:
            while True:
                try:
                    event = self._events.get_nowait()
                except queue.Empty:
                    return
                self._handle(event)

    def _deliver(self, event):
        box = self._inbox.setdefault(event.get("id"), collections.deque())
        if event.get("event") == P.PROGRESS and box and box[-1].get("event") == P.PROGRESS and \
                box[-1].get("stage") == event.get("stage"):
            box[-1] = event  # nobody read the last one: keep the newest (the queue stays small)
        else:
            box.append(event)

    def _end(self, rid):
        self._pending.pop(rid, None)
        self._owner.pop(rid, None)
        self._resend.pop(rid, None)
        self._stage.pop(rid, None)
        self._killed_to_cancel.discard(rid)
        for path in self._request_files.pop(rid, []):
            Path(path).unlink(missing_ok=True)
        for file, users in list(self._file_users.items()):
            if rid in users:
                users.discard(rid)
                self._release(file)

    def _handle(self, event):
        if event.get("event") == "_exit":
            process = event["process"]
            if process is self._process:
                self._process = None
                self._known_volumes.clear()
                if self._outbox is not None:
                    self._outbox.put(None)
                    self._outbox = None
            # the requests sent to this process end here, even if a newer worker already runs
            lost = sorted((rid for rid, owner in self._owner.items() if owner is process), key=str)
            if not lost:
                return
            cancelled = set(self._killed_to_cancel)
            if set(lost) - cancelled:
                self.deaths += 1
            why = _exit_reason(event["returncode"], self.log_path)
            for rid in lost:
                self._deliver({"id": rid, "event": P.CANCELLED} if rid in cancelled else
                              {"id": rid, "event": P.ERROR, "code": P.WORKER_DIED,
                               "message": f"the RadCLIP worker stopped unexpectedly ({why}); "
                                          "it starts again with the next request"})
                self._end(rid)
            return
        rid, kind = event.get("id"), event.get("event")
        request = self._pending.get(rid)
        if kind == P.ERROR and event.get("code") == P.NEED_VOLUME and rid in self._resend:
            # the worker no longer holds this volume (evicted): the same request again, with the voxels
            array, key = self._resend.pop(rid)
            self._known_volumes.discard(key)
            self._send(request, {"array": (array, key)})
            return
        if kind == P.PROGRESS:
            self._stage[rid] = event.get("stage")
        if kind in P.FINAL_EVENTS:
            if kind == P.RESULT and request is not None and request.get("volume_key") is not None:
                self._known_volumes.add(request["volume_key"])
            self._end(rid)
        self._deliver(event)


def _kill_tree(process):
    """Kill the worker and its children (PythonSlicer is a launcher: the real Python is a child)."""
    if process.poll() is not None:
        return
    if os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True)
    else:
        import signal

        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _exit_reason(returncode, log_path: Path) -> str:
    if returncode is not None and returncode < 0:
        import signal

        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}" + (" — out of memory?" if name == "SIGKILL" else "")
    tail = ""
    try:
        lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
        tail = lines[-1][:200] if lines else ""
    except OSError:
        pass
    return f"exit status {returncode}" + (f": {tail}" if tail else "")

"""The Slicer side of the worker protocol (no Qt, no MRML): start, talk to and restart the worker.

The worker (`python -m RadCLIPCore serve`, see RadCLIPCore/commands/serve.py) runs outside
Slicer's process: no GIL contention with Slicer's main thread, a real cancel, crashes and
out-of-memory stay outside Slicer, and GPU memory returns when it exits. Its command is a setting:
by default Slicer's own Python (`PythonSlicer`), or e.g. `ssh gpu-box /opt/venv/bin/python -m
RadCLIPCore serve` for a GPU server that shares no files with this machine (transport "inline":
the voxels travel inside the protocol).

The GUI thread calls `request(...)` and then `poll()` from a timer; `wait()` blocks (scripts, tests).
A reader thread only moves stdout lines into a queue. When the worker dies, every pending request
gets one `error` event saying so, and the next request starts a fresh worker.
"""
from __future__ import annotations

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

from RadCLIPCore.protocol import FINAL_EVENTS, encode_array

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
        self._events: queue.Queue = queue.Queue()
        self._ids = itertools.count(1)
        self._files = itertools.count(1)
        self._pending: dict = {}  # id -> the request (kept to resend voxels on `need_volume`)
        self._known_volumes: set = set()  # volume keys this worker process holds
        self._resend: dict = {}  # id -> (voxels, key) of a request that sent the key alone
        self._volume_files: dict = {}  # volume key -> .npy written for the "file" transport
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
        threading.Thread(target=self._read, args=(self._process,), name="radclip-worker-reader", daemon=True).start()

    def _read(self, process):
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue  # not a protocol line (the worker keeps its own output on stderr)
            self._events.put(event)
        process.wait()
        self._events.put({"id": None, "event": "_exit", "process": process, "returncode": process.returncode})

    def stop(self, timeout: float = 10.0):
        """Ask the worker to shut down; kill it if it does not within `timeout` seconds."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                self._send({"id": next(self._ids), "op": "shutdown"})
                process.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self._process = None

    def kill(self):
        """Stop the worker and its children at once (the last resort; pending requests get an error)."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/T", "/F", "/PID", str(process.pid)], capture_output=True)
        else:
            import signal

            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def close(self):
        self.stop()
        self._tmp.cleanup()

    # ------------------------------------------------------------------ requests
    def _send(self, request: dict):
        try:
            self._process.stdin.write((json.dumps(request) + "\n").encode("utf-8"))
            self._process.stdin.flush()
        except (OSError, ValueError):  # a dead worker: its exit is reported by the reader
            pass

    def request(self, op: str, **fields) -> int:
        """Send a request (starting the worker if needed); returns its id."""
        self.start()
        rid = next(self._ids)
        request = {"id": rid, "op": op, **fields}
        self._pending[rid] = request
        self._send(request)
        return rid

    def send_rank(self, prompts, array=None, ijk_to_ras=None, volume_key=None, path=None, labelmap=None,
             segments=None, **options) -> int:
        """A `rank` request for voxels `array` (k, j, i) with their 4x4 IJK-to-RAS matrix, or a file
        `path`. `volume_key` (changes when voxels or geometry change) lets the worker reuse what it
        holds: the voxels are sent only when it does not hold them."""
        fields = dict(options, prompts=list(prompts))
        if path is not None:
            fields["volume"] = str(path)
        else:
            fields["ijk_to_ras"] = np.asarray(ijk_to_ras, dtype=float).tolist()
            if volume_key is not None:
                fields["volume_key"] = volume_key
            if volume_key is None or volume_key not in self._known_volumes or not self.running:
                fields["array"] = self._array_field(array, volume_key)
        if labelmap is not None:
            fields["labelmap"] = self._array_field(labelmap, None)
            fields["segments"] = {str(k): v for k, v in (segments or {}).items()}
        rid = self.request("rank", **fields)
        if path is None and "array" not in fields:
            self._resend[rid] = (array, volume_key)  # in case the worker no longer holds it
        return rid

    def _array_field(self, array, key) -> dict:
        if self.transport == "inline":
            return encode_array(np.asarray(array))
        if key is not None and key in self._volume_files:
            return {"npy": self._volume_files[key]}
        path = Path(self._tmp.name) / f"voxels-{next(self._files)}.npy"
        np.save(path, np.asarray(array), allow_pickle=False)
        if key is not None:
            for old in self._volume_files.values():  # keep one file: the current volume
                Path(old).unlink(missing_ok=True)
            self._volume_files = {key: str(path)}
        return {"npy": str(path)}

    def cancel(self, rid: int):
        """Stop request `rid` within one slice batch; it then answers `cancelled`."""
        if self.running and rid in self._pending:
            self._send({"id": rid, "op": "cancel"})

    # ------------------------------------------------------------------ events
    def poll(self) -> list:
        """Events that arrived since the last call (never blocks). A dead worker turns into one
        `error` event per pending request."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            events.extend(self._handle(event))

    def wait(self, rid: int, timeout: float = 600.0, on_event=None) -> dict:
        """Block until request `rid` ends; returns its final event. `on_event` sees every event."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"the RadCLIP worker did not answer request {rid} in {timeout:.0f} s") from None
                continue
            for e in self._handle(event):
                if on_event is not None:
                    on_event(e)
                if e.get("id") == rid and e.get("event") in FINAL_EVENTS:
                    return e

    def _handle(self, event) -> list:
        if event.get("event") == "_exit":
            if event["process"] is not self._process and self._process is not None:
                return []  # an older worker's exit, already handled
            self._process = None
            self._known_volumes.clear()
            if not self._pending:
                return []
            self.deaths += 1
            why = _exit_reason(event["returncode"], self.log_path)
            lost = [{"id": rid, "event": "error", "message": f"the RadCLIP worker stopped unexpectedly ({why}); "
                     "it starts again with the next request"} for rid in sorted(self._pending)]
            self._pending.clear()
            self._resend.clear()
            return lost
        rid, kind = event.get("id"), event.get("event")
        request = self._pending.get(rid)
        if kind == "error" and event.get("code") == "need_volume" and rid in self._resend:
            # the worker no longer holds this volume (evicted): the same request again, with the voxels
            array, key = self._resend.pop(rid)
            self._known_volumes.discard(key)
            request["array"] = self._array_field(array, key)
            self._send(request)
            return []
        if kind in FINAL_EVENTS:
            self._pending.pop(rid, None)
            self._resend.pop(rid, None)
            if kind == "result" and request is not None and request.get("volume_key") is not None:
                self._known_volumes.add(request["volume_key"])
        return [event]


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

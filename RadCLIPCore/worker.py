"""The compute side of the worker process (`python -m RadCLIPCore serve`): one request in, events out.

The serve command owns stdin/stdout and threads; this module only computes. A `WorkerSession`
keeps loaded models and, per model, the volume embeddings it made, so a second request for the
same volume with new prompts costs only the text tower.

Requests are dicts: the JSON objects of `RadCLIPCore.protocol`, where every op, field, event and
the result record is defined; `serve` checks each request there before it reaches this module.
"""
from __future__ import annotations

import gc
import hashlib
from collections import OrderedDict
from typing import Callable

import numpy as np
import torch


from .labelmaps import LabelMap
from .errors import RadCLIPError
from .volume_io import Volume, read_volume
from .loading import load_model
from .presets import DEFAULT_MODEL
from . import protocol as P
from .anatomy_lexicon import load_anatomy_lexicon
from .findings import (FindingTemplates, OperatingPoints, anatomy_labelmap, check_findings, findings_record,
                       model_templates, model_thresholds)

VOLUMES_KEPT = 4  # volumes remembered by key (the model's own cache keeps their embeddings)


class Cancelled(Exception):
    """Raised inside a request when the client asked to cancel it."""


class NeedVolume(RadCLIPError):
    """The request gave only a `volume_key` this worker does not hold."""

    code = P.NEED_VOLUME


class WorkerSession:
    """Models, volumes and embeddings kept between requests of one worker process."""

    def __init__(self):
        self._models: dict = {}
        self._volumes: OrderedDict = OrderedDict()
        # (model, volume key, plane, max slices, label map) -> (volume embedding, anatomy embeddings)
        self._embeddings: OrderedDict = OrderedDict()

    # ------------------------------------------------------------------ models
    def model(self, request: dict, emit: Callable[[dict], None]):
        key = (str(request.get("model") or DEFAULT_MODEL), request.get("device", "auto"),
               request.get("precision", "auto"), bool(request.get("offline")), request.get("config"),
               request.get("pooling"))
        if key not in self._models:
            emit({"event": P.PROGRESS, "stage": P.LOADING_MODEL, "detail": key[0]})
            self._models[key] = load_model(key[0], device=key[1], precision=key[2], offline=key[3] or None,
                                           config=key[4], pooling=key[5])
        return self._models[key]

    def unload(self):
        """Free every model, cached embedding and volume; give the memory back to the system."""
        self._models.clear()
        self._volumes.clear()
        self._embeddings.clear()
        gc.collect()
        release_memory()

    # ------------------------------------------------------------------ volumes
    def volume(self, request: dict) -> Volume:
        key = request.get("volume_key")
        if key is not None and key in self._volumes:
            self._volumes.move_to_end(key)
            return self._volumes[key]
        if "volume" in request:
            volume = read_volume(str(request["volume"]))
        elif "array" in request:
            if "ijk_to_ras" not in request:
                raise P.ProtocolError("'array' needs 'ijk_to_ras' (the 4x4 IJK-to-RAS matrix)")
            volume = Volume.from_ijk_to_ras(P.decode_array(request["array"]), P.ijk_to_ras(request["ijk_to_ras"]))
        elif key is not None:
            raise NeedVolume(f"this worker does not hold volume '{key}'; send its voxels")
        else:
            raise P.ProtocolError("a rank request needs 'volume' (a path) or 'array' with 'ijk_to_ras'")
        if key is not None:
            self._volumes[key] = volume
            while len(self._volumes) > VOLUMES_KEPT:
                self._volumes.popitem(last=False)
        return volume

    # ------------------------------------------------------------------ requests
    def rank_request(self, request: dict, emit: Callable[[dict], None], cancelled: Callable[[], bool]) -> dict:
        """The `rank` op: the `rank --json` record, plus per-segment rankings for a label map."""
        prompts = P.check_request(request)["prompts"]

        def provisional(model, subset, total):  # the subset's ranking, sent before the rest is embedded
            emit({"event": P.PROVISIONAL, "result": model.ranking_record(subset, prompts),
                  "slices": len(subset.sampled_slices), "total": total})

        model, emb, anatomies, _, embedded = self._embedded(request, emit, cancelled, lexicon=None,
                                                            provisional=provisional)
        emit({"event": P.PROGRESS, "stage": P.RANKING_PROMPTS})
        record = model.ranking_record(emb, prompts, anatomies)
        record["embedded"] = embedded  # False: served from the embedding cache
        return record

    def findings_request(self, request: dict, emit: Callable[[dict], None], cancelled: Callable[[], bool]) -> dict:
        """The `findings` op: the `findings --json` record (each finding on the volume and, with a
        label map, on each report-level anatomy of the bundled TotalSegmentator lexicon)."""
        P.check_request(request)
        findings = check_findings(request["findings"])
        templates = FindingTemplates.from_dict(request["templates"]) if request.get("templates") else None
        thresholds = OperatingPoints.read(request["thresholds"]) if request.get("thresholds") else None
        model, emb, anatomies, (segments, unknown), embedded = self._embedded(request, emit, cancelled,
                                                                             lexicon=load_anatomy_lexicon())
        emit({"event": P.PROGRESS, "stage": P.SCORING_FINDINGS})
        record = findings_record(model, emb, findings, templates or model_templates(model),
                                 thresholds or model_thresholds(model), anatomies, segments, unknown)
        record["embedded"] = embedded
        return record

    def _embedded(self, request, emit, cancelled, lexicon, provisional=None):
        """(model, VolumeEmbedding, AnatomyEmbeddings or None, ({anatomy: segment names}, unknown segment
        names) of the lexicon's grouping, whether slices went through the tower).
        `provisional(model, VolumeEmbedding of the first slices, slices to embed)` is called once those
        are embedded (not for an embedding served from the cache).
        A volume known by key is not read again; with a label map, its anatomies (segments, or the
        lexicon's anatomies when `lexicon` is given) are remembered with the volume, so new prompts or
        findings on them cost only text-tower work."""
        model = self.model(request, emit)
        max_slices = request.get("max_slices") or None  # 0 = every slice
        plane = request.get("plane") or None
        key = request.get("volume_key")
        min_patches = float(request.get("min_patches", 1.0))
        labelmap = self._labelmap(request) if "labelmap" in request else None
        seg_key = None
        if labelmap is not None:
            seg_key = (hashlib.blake2b(np.ascontiguousarray(labelmap.volume.array).tobytes(), digest_size=16).hexdigest(),
                       tuple(sorted(labelmap.names.items())), min_patches, lexicon is not None)
        remembered = (id(model), key, plane, max_slices, seg_key) if key is not None else None
        embedded = []

        def progress(done, total):
            if cancelled():
                raise Cancelled()
            embedded.append(total)
            emit({"event": P.PROGRESS, "stage": P.EMBEDDING_SLICES, "done": done, "total": total})

        def early(subset):
            if provisional is not None and not cancelled():
                provisional(model, subset, embedded[-1])

        if cancelled():
            raise Cancelled()
        if remembered is not None and remembered in self._embeddings:
            self._embeddings.move_to_end(remembered)
            emb, anatomies, groups = self._embeddings[remembered]
            return model, emb, anatomies, groups, False
        anatomies, groups = None, ({}, [])
        if labelmap is not None:  # one pass of the tower gives the volume and every segment
            labels = sorted(int(k) for k in request.get("segments") or {}) or None
            if lexicon is not None:
                labelmap, segments, unknown = anatomy_labelmap(labelmap, lexicon)
                labels, groups = None, (segments, unknown)
            emb, anatomies = model.embed_volume_and_anatomies(
                self.volume(request), labelmap, labels=labels, plane=plane, max_slices=max_slices,
                min_patches=min_patches, batch_size=request.get("batch_size"), progress=progress, provisional=early)
        else:
            emb = model.embed_volume(self.volume(request), plane=plane, max_slices=max_slices,
                                     batch_size=request.get("batch_size"), progress=progress, provisional=early)
        if remembered is not None:
            self._embeddings[remembered] = (emb, anatomies, groups)
            while len(self._embeddings) > VOLUMES_KEPT:
                self._embeddings.popitem(last=False)
        return model, emb, anatomies, groups, bool(embedded)

    @staticmethod
    def _labelmap(request) -> LabelMap:
        names = {int(k): str(v) for k, v in (request.get("segments") or {}).items()}
        return LabelMap(Volume.from_ijk_to_ras(P.decode_array(request["labelmap"]), P.ijk_to_ras(request["ijk_to_ras"])),
                        names)


def release_memory():
    """Return freed memory to the operating system (CUDA cache; glibc's heap where there is one)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows): the allocator keeps its own policy
        pass

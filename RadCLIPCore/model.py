"""Inference: embed volumes, images and texts, and rank prompts.

`RadCLIPModel` holds a transformers `CLIPModel`, its tokenizer, an optional trained
`SlicePoolingAdapter` (else global average pooling), the preprocessing settings and the
temperature. Embed once, query many times: volume embeddings are cached by content + settings,
text embeddings per text, so ranking new prompts on an embedded volume runs only the text tower.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import SlicePoolingAdapter, mean_pool
from .anatomy import pool_anatomies
from .encoders import PRECISIONS, image_features, is_quantized, quantize_vision_int8, resolve_device, resolve_precision, text_features
from .errors import RadCLIPError
from .findings import prompt_softmax, score_findings
from .volume_io import Volume, as_volume
from .preprocessing import (PLANES, PreprocessConfig, clip_processor_config, check_volume_shape, fill_skipped_slices, prepare_image,
                            prepare_volume)

log = logging.getLogger("RadCLIPCore")

VOLUME_CACHE_SIZE = 8
TEXT_CACHE_SIZE = 4096
TEXT_BATCH_SIZE = 256  # texts per text-tower forward
PROVISIONAL_SLICES = 16  # a volume of more than twice this many slices embeds this many, evenly spaced, first


@dataclass
class VolumeEmbedding:
    """The result of `embed_volume`.

    `slice_weights[n]` belongs to slice n of the *input* array along `slice_axis` (numpy axis of the
    array as read by SimpleITK / Slicer's `arrayFromVolume`), whatever reorientation happened inside.
    """

    embedding: np.ndarray  # (dim,) float32, unit norm
    slice_weights: np.ndarray  # (n_slices,) float32, sums to 1, input order
    slice_axis: int
    plane: str
    sampled_slices: np.ndarray  # input slice indices that went through the image encoder
    slice_embeddings: np.ndarray = field(repr=False)  # (len(sampled_slices), dim), unit norm, input order
    pooling: str = "mean"

    def __post_init__(self):  # results are shared through the cache: nobody may edit them in place
        for value in (self.embedding, self.slice_weights, self.sampled_slices, self.slice_embeddings):
            value.flags.writeable = False

    @property
    def most_attended_slice(self) -> int:
        return int(np.argmax(self.slice_weights))


class SliceEmbeddings(NamedTuple):
    prepared: object  # the PreparedVolume: plane, sampled slices, the map back to the input
    embeddings: torch.Tensor  # (len(prepared.sampled), dim) unit norm, canonical slice order
    patches: torch.Tensor | None = None  # (len(prepared.sampled), patches, dim) unit norm, or None


class RankedPrompt(NamedTuple):
    prompt: str
    probability: float
    cosine: float


class RadCLIPModel:
    def __init__(self, clip, tokenizer, adapter: SlicePoolingAdapter | None = None,
                 preprocess: PreprocessConfig | None = None, temperature: float | None = None,
                 plane: str = "auto", device="auto", precision="auto", batch_size: int | None = None,
                 source: str | None = None, card: str | None = None, anatomy_head=None, finding_templates=None):
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)  # fp32, bf16, fp16 or int8: what runs
        self.dtype = PRECISIONS[self.precision]
        self.clip = clip.to(self.device, self.dtype).eval()  # int8: quantised at the first image encoded
        self.tokenizer = tokenizer
        self.adapter = adapter.to(self.device, torch.float32).eval() if adapter is not None else None
        self.anatomy_head = anatomy_head.to(self.device, torch.float32).eval() if anatomy_head is not None else None
        # a CLIP model without recorded preprocessing was trained as CLIP is: its image processor on 8-bit images
        self.preprocess = preprocess or clip_processor_config(clip.config.vision_config.image_size)
        if temperature is None:
            temperature = float(1.0 / clip.logit_scale.detach().float().exp())
        if not temperature > 0:
            raise RadCLIPError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        if plane != "auto" and plane not in PLANES:
            raise RadCLIPError(f"unknown plane policy '{plane}'")
        self.plane = plane
        self.batch_size = _positive_int(batch_size, "batch size") or (64 if self.device.type == "cuda" else 16)
        self.source = source
        self.card = card
        self.finding_templates = finding_templates  # findings.FindingTemplates of the model folder (None: defaults)
        self._volumes: OrderedDict = OrderedDict()
        self._texts: OrderedDict = OrderedDict()

    # ----------------------------------------------------------------- properties
    @property
    def pooling(self) -> str:
        return "adapter" if self.adapter is not None else "mean"

    @property
    def dim(self) -> int:
        return int(self.clip.config.projection_dim)

    def clear_cache(self):
        self._volumes.clear()
        self._texts.clear()

    # ----------------------------------------------------------------- encoders
    @torch.inference_mode()
    def encode_pixels(self, pixels: torch.Tensor, patch_tokens: bool = False):
        """(N, 3, S, S) preprocessed slices -> (N, dim) float32 unit-norm embeddings; with
        `patch_tokens`, also their (N, patches, dim) unit-norm patch vectors (same forward pass)."""
        pixels = pixels.to(self.device, self.dtype)
        if self.precision == "int8":
            if not is_quantized(self.clip.vision_model):
                quantize_vision_int8(self.clip)  # not before: until then the model can still be saved
            # dynamic int8 scales activations per forward: one slice per forward, so that a slice's
            # embedding never depends on the slices that share its batch
            outs = [image_features(self.clip, pixels[i:i + 1], patch_tokens) for i in range(len(pixels))]
            feats = torch.cat(outs) if not patch_tokens else tuple(torch.cat(o) for o in zip(*outs))
        else:
            feats = image_features(self.clip, pixels, patch_tokens)
        if not patch_tokens:
            return F.normalize(feats.float(), dim=-1)
        return F.normalize(feats[0].float(), dim=-1), F.normalize(feats[1].float(), dim=-1)

    @torch.inference_mode()
    def pool(self, slices: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """(B, S, dim) slice embeddings -> (embedding (B, dim), weights (B, S))."""
        slices = slices.to(self.device, torch.float32)
        if self.adapter is None:
            return mean_pool(slices, padding_mask)
        return self.adapter(slices, padding_mask)

    # ----------------------------------------------------------------- volumes
    def embed_volume(self, source, spacing=None, direction=None, plane=None, max_slices=None,
                     batch_size=None, progress=None, provisional=None) -> VolumeEmbedding:
        """Embed a volume: a path (file or DICOM folder), a `Volume`, or a `(k, j, i)` array with
        `spacing` (i, j, k) in mm and an LPS `direction`. `plane=None` uses the model's plane policy.
        `progress(done, total)` and `provisional(VolumeEmbedding)`: see `embed_slices` (neither is
        called when the embedding comes from the cache).
        """
        plane = plane or self.plane
        _positive_int(batch_size, "batch size")  # checked before any reading or encoding
        settings = (plane, _positive_int(max_slices, "max slices"))
        path_key = _path_key(source, settings)
        if path_key is not None and path_key in self._volumes:
            return self._cache_hit(path_key)
        volume = as_volume(source, spacing, direction)
        check_volume_shape(volume)
        content_key = (_content_hash(volume),) + settings
        if content_key in self._volumes:
            result = self._cache_hit(content_key)
        else:
            result = self._volume_embedding(self.embed_slices(volume, plane, max_slices, batch_size, progress,
                                                              provisional=self._provisional_volume(provisional)))
            self._remember(self._volumes, content_key, result, VOLUME_CACHE_SIZE)
        if path_key is not None:
            self._remember(self._volumes, path_key, result, VOLUME_CACHE_SIZE)
        return result

    def _provisional_volume(self, provisional):
        """`provisional(VolumeEmbedding)` as embed_slices' `provisional(SliceEmbeddings)`."""
        if provisional is None:
            return None
        return lambda subset: provisional(self._volume_embedding(subset))

    def _cache_hit(self, key):
        self._volumes.move_to_end(key)
        return self._volumes[key]

    def embed_slices(self, volume: Volume, plane=None, max_slices=None, batch_size=None, progress=None,
                     patch_tokens=False, provisional=None):
        """`SliceEmbeddings(prepared, embeddings, patches)`: the volume prepared for the model, the
        (len(prepared.sampled), dim) unit-norm embedding of each embedded slice in canonical order,
        and with `patch_tokens` their (len(sampled), patches, dim) patch vectors from the same pass
        of the vision tower (else None).

        The one path from a volume to per-slice embeddings: inference, the anatomy embeddings and
        the stage-2 cache use it. Slices go through the tower in one fixed order (`embedding_order`):
        for more than 2 x PROVISIONAL_SLICES slices, PROVISIONAL_SLICES evenly spaced ones first,
        then the rest. `provisional(SliceEmbeddings)` (optional) is called once the first group is
        embedded, with those slices alone (`prepared.sampled` is their subset): an early answer.
        The final result is the same with or without it (the same batches run either way).
        `progress(done, total)` is called after each slice batch (slices embedded so far, slices to
        embed); an exception it raises stops the work there (that is how a caller cancels).
        """
        prepared = prepare_volume(volume, plane or self.plane, max_slices, self.preprocess)
        batch_size = _positive_int(batch_size, "batch size") or self.batch_size
        total = len(prepared.sampled)
        groups = embedding_order(total)
        outputs, done = [], 0
        for group in groups:
            part = dataclasses.replace(prepared, sampled=prepared.sampled[group])
            for pixels in _prefetched(part.pixel_batches(batch_size)):
                out = self.encode_pixels(pixels, patch_tokens)
                outputs.append(out if patch_tokens else (out, None))
                done += len(pixels)
                if progress is not None:
                    progress(done, total)
            if provisional is not None and len(groups) > 1 and group is groups[0]:
                embeddings = torch.cat([o[0] for o in outputs])
                provisional(SliceEmbeddings(part, embeddings,
                                            torch.cat([o[1] for o in outputs]) if patch_tokens else None))
        position = np.argsort(np.concatenate(groups), kind="stable")  # back to canonical order
        embeddings = torch.cat([o[0] for o in outputs])[position]
        patches = torch.cat([o[1] for o in outputs])[position] if patch_tokens else None
        return SliceEmbeddings(prepared, embeddings, patches)

    def embed_volume_and_anatomies(self, source, labelmap, labels=None, plane=None, max_slices=None,
                                   min_patches: float = 1.0, batch_size=None, progress=None, provisional=None):
        """(VolumeEmbedding, AnatomyEmbeddings) from one pass of the vision tower over the slices:
        the CLS token gives the volume, the patch tokens the anatomies of `labelmap` (a LabelMap).
        The volume embedding is remembered like `embed_volume`'s. `provisional(VolumeEmbedding)`:
        the volume's early answer, as in `embed_volume`."""
        plane = plane or self.plane
        volume = as_volume(source)
        check_volume_shape(volume)
        slices = self.embed_slices(volume, plane, max_slices, batch_size, progress, patch_tokens=True,
                                   provisional=self._provisional_volume(provisional))
        embedding = self._volume_embedding(slices)
        key = (_content_hash(volume), plane, _positive_int(max_slices, "max slices"))
        self._remember(self._volumes, key, embedding, VOLUME_CACHE_SIZE)
        anatomies = pool_anatomies(self, slices, volume, labelmap, labels, min_patches)
        return embedding, anatomies

    def _volume_embedding(self, slices) -> VolumeEmbedding:
        prepared, slices = slices.prepared, slices.embeddings
        embedding, weights = self.pool(slices.unsqueeze(0))
        self._finite(torch.cat([embedding.flatten(), weights.flatten()]).float().cpu().numpy())
        sampled_input, order = prepared.sampled_input_order()
        return VolumeEmbedding(
            embedding=embedding[0].float().cpu().numpy(),
            slice_weights=prepared.to_input_order(weights[0].float().cpu().numpy()),
            slice_axis=prepared.slice_axis,
            plane=prepared.plane,
            sampled_slices=sampled_input,
            slice_embeddings=slices.cpu().numpy()[order],
            pooling=self.pooling,
        )

    # ----------------------------------------------------------------- images
    def embed_image(self, source, spacing=None) -> np.ndarray:
        """A 2D image (path, `Volume` one slice thick, or `(rows, cols)` array) -> (dim,) unit norm."""
        volume = as_volume(source, spacing)
        return self._finite(self.encode_pixels(prepare_image(volume, self.preprocess))[0].cpu().numpy())

    def _finite(self, values: np.ndarray) -> np.ndarray:
        """Never hand out a NaN as a result: a broken model (weights, preprocessing) says so."""
        if not np.all(np.isfinite(values)):
            raise RadCLIPError(f"model '{self.source}' produced non-finite values (NaN/Inf) for this input; "
                               "its weights or preprocessing settings are broken")
        return values

    # ----------------------------------------------------------------- texts
    def embed_texts(self, texts) -> np.ndarray:
        """(k, dim) float32 unit-norm text embeddings; each distinct text is encoded once."""
        texts = _check_prompts(texts)
        # this call's vectors are held here, not read back from the bounded cache: a call with more
        # distinct texts than the cache holds (report-level manifests) must not lose its own texts
        found = {t: self._texts[t] for t in dict.fromkeys(texts) if t in self._texts}
        missing = [t for t in dict.fromkeys(texts) if t not in found]
        for start in range(0, len(missing), TEXT_BATCH_SIZE):  # bounded memory for tens of thousands
            chunk = missing[start:start + TEXT_BATCH_SIZE]
            found.update(zip(chunk, self._encode_texts(chunk)))
        for text in missing:
            self._remember(self._texts, text, found[text], TEXT_CACHE_SIZE)
        return np.stack([found[t] for t in texts])

    @torch.inference_mode()
    def _encode_texts(self, texts) -> np.ndarray:
        limit = min(self.tokenizer.model_max_length, self.clip.config.text_config.max_position_embeddings)
        for text, n in zip(texts, (len(ids) for ids in self.tokenizer(texts)["input_ids"])):
            if n > limit:
                log.warning("prompt truncated to the tokenizer's %d-token limit (it has %d): '%s'",
                            limit, n, _shorten(text))
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        feats = text_features(self.clip, tokens["input_ids"].to(self.device),
                              tokens["attention_mask"].to(self.device))
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    # ----------------------------------------------------------------- ranking
    def rank(self, embedding, prompts) -> list[RankedPrompt]:
        """Rank prompts for a `VolumeEmbedding` or an image embedding (dim,), best first.

        Probabilities are the softmax over the prompts of cosine / temperature.
        """
        prompts = _check_prompts(prompts)
        vec = embedding.embedding if isinstance(embedding, VolumeEmbedding) else np.asarray(embedding)
        if vec.shape != (self.dim,):
            raise RadCLIPError(f"expected an embedding of shape ({self.dim},), got {vec.shape}")
        cosines = self.embed_texts(prompts) @ vec.astype(np.float32)
        probs = prompt_softmax(cosines, self.temperature)
        self._finite(np.concatenate([cosines, probs]))
        order = np.argsort(-cosines, kind="stable")
        return [RankedPrompt(prompts[i], float(probs[i]), float(cosines[i])) for i in order]

    def findings(self, embedding, findings, templates=None, thresholds=None, anatomy=None, vector=None,
                 covered_slices=None):
        """Each finding on its own (present vs absent, prompt ensembles): see `findings.score_findings`."""
        return score_findings(self, embedding, findings, templates, anatomy, vector, covered_slices, thresholds)

    def ranking_record(self, embedding, prompts, anatomies=None) -> dict:
        """The JSON-ready result that `rank --json` prints and the worker sends: prompts best first
        with probability, cosine and (for volumes) per-slice relevance, plus the slice weights; with
        `anatomies` (AnatomyEmbeddings of a segmentation) also the ranking per segment and the
        segments that could not be ranked, with why."""
        record = self._ranking_record(embedding, prompts)
        if anatomies is not None:
            record["segments"] = [{"segment": anatomies.names[v],
                                   "prompts": [{"text": r.prompt, "probability": r.probability, "cosine": r.cosine}
                                               for r in self.rank(vec, prompts)]}
                                  for v, vec in sorted(anatomies.embeddings.items())]
            record["missing_segments"] = {anatomies.names[v]: why for v, why in anatomies.missing.items()}
        return record

    def _ranking_record(self, embedding, prompts) -> dict:
        ranked = self.rank(embedding, prompts)
        if not isinstance(embedding, VolumeEmbedding):  # a 2D image: no slices
            return {"prompts": [{"text": r.prompt, "probability": r.probability, "cosine": r.cosine,
                                 "relevance": None} for r in ranked],
                    **dict.fromkeys(("slice_weights", "slice_axis", "plane", "most_attended_slice", "pooling")),
                    "model": self.source, "precision": self.precision}
        relevance = dict(zip(prompts, self.slice_relevance(embedding, prompts)))
        return {"prompts": [{"text": r.prompt, "probability": r.probability, "cosine": r.cosine,
                             "relevance": relevance[r.prompt].tolist()} for r in ranked],
                "slice_weights": embedding.slice_weights.tolist(), "slice_axis": embedding.slice_axis,
                "plane": embedding.plane, "most_attended_slice": embedding.most_attended_slice,
                "pooling": embedding.pooling, "model": self.source, "precision": self.precision}

    def slice_relevance(self, embedding: VolumeEmbedding, prompts) -> np.ndarray:
        """(len(prompts), input slices): where along the volume each prompt matches.

        Each embedded slice's cosine with the prompt, softmax over the slices at the model's
        temperature; slices skipped by `max_slices` get the linear interpolation of their embedded
        neighbours, and each row sums to 1. Unlike the adapter's attention, which is one set of
        weights for the volume, this is per prompt and exists for every model (mean pooling too).
        """
        texts = self.embed_texts(_check_prompts(prompts))
        cosines = texts @ np.asarray(embedding.slice_embeddings, np.float32).T  # (k, sampled)
        per_sampled = prompt_softmax(cosines, self.temperature)  # over the slices
        n = len(embedding.slice_weights)
        return self._finite(np.stack([fill_skipped_slices(embedding.sampled_slices, r, n) for r in per_sampled]))

    @staticmethod
    def _remember(cache: OrderedDict, key, value, limit):
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)


def _prefetched(batches, depth=2):
    """Prepare the next slice batches in a background thread while the encoder runs.

    numpy/torch release the GIL, so CPU preprocessing overlaps the (GPU or CPU) encoder.
    Errors in the producer are re-raised here; stopping early stops the producer.
    """
    items: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in batches:
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:  # handed to the consumer, raised there
            offer(exc)

    worker = threading.Thread(target=produce, name="radclip-preprocess", daemon=True)
    worker.start()
    try:
        while True:
            item = items.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


def embedding_order(n: int, first: int = PROVISIONAL_SLICES) -> list:
    """The order in which `n` sampled slices go through the tower, as groups of positions: for
    n > 2 * first, `first` evenly spaced positions (both ends included), then the others in order;
    else one group. Every run uses it, so a run with an early answer computes the same batches."""
    if n <= 2 * first:
        return [np.arange(n)]
    head = np.unique(np.linspace(0, n - 1, first).round().astype(np.int64))
    return [head, np.setdiff1d(np.arange(n), head)]


def _positive_int(value, name):
    """None stays None (use the default); anything else must be a whole number >= 1."""
    if value is None:
        return None
    try:
        whole = not isinstance(value, bool) and float(value).is_integer() and int(value) >= 1
    except (TypeError, ValueError, OverflowError):
        whole = False
    if not whole:
        raise RadCLIPError(f"{name} must be a whole number of at least 1, got {value!r}")
    return int(value)


def _shorten(text, n=60):
    return text if len(text) <= n else text[: n - 3] + "..."


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise RadCLIPError("no prompts given: pass at least one text")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise RadCLIPError(f"prompt {i + 1} is not text: {p!r}")
        if not p.strip():
            raise RadCLIPError(f"prompt {i + 1} is empty or whitespace")
    return prompts


def _path_key(source, settings):
    """A cheap key for a file or DICOM folder (path, sizes, mtimes) so a repeat skips reading."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.path.expanduser(str(source)))
    try:
        if path.is_dir():
            stamp = tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                 for e in os.scandir(path) if e.is_file()))
        else:
            st = path.stat()
            stamp = (st.st_size, st.st_mtime_ns)
    except OSError:
        return None
    return ("path", str(path.resolve()), stamp) + settings


def _content_hash(volume: Volume) -> str:
    h = hashlib.blake2b(digest_size=20)
    arr = np.ascontiguousarray(volume.array)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.asarray(volume.spacing, dtype=np.float64).tobytes())
    h.update(np.asarray(volume.direction, dtype=np.float64).tobytes())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()

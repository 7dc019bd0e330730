"""`load_model(source)` for every model source, and `save_model` for our own model folder.

Sources:
1. a local Hugging Face CLIP folder (`CLIPModel.save_pretrained` + tokenizer files);
2. a Hugging Face hub id (default `openai/clip-vit-large-patch14`, the paper's model), through
   transformers' `from_pretrained` and the standard HF cache; `offline=True` or
   `HF_HUB_OFFLINE=1` uses the cache only;
3. a RadCLIP model folder (`radclip_config.json`, `clip/`, `adapter.safetensors`, `README.md`);
4. a `.pth`/`.pt` state_dict of a full `CLIPModel` — the published `RadCLIP.pth` of
   `zluvolyote/RadCLIP` — read with `torch.load(weights_only=True)` onto the ViT-L/14
   architecture bundled in this package (or `config=`), so it works air-gapped.
The preset name `radclip` downloads `RadCLIP.pth` from the hub (or finds it in the HF cache).

Hub sources look in the cache first and use no network at all when the model is there. When it is
not, a short bounded probe of the hub endpoint (`HF_ENDPOINT`) comes before any download, so that a
machine without internet gets one whole line at once, not the hub client's retries and warnings.
Every file and setting is checked before it is used: a wrong model folder is one line naming what
is wrong, never wrong answers.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPTokenizer

from .adapter import AdapterConfig, SlicePoolingAdapter
from .anatomy import POOLINGS as ANATOMY_POOLINGS, AnatomyHead
from .encoders import align_token_ids, bundled_tokenizer, is_quantized, read_clip_config, resolve_device, resolve_precision
from .errors import RadCLIPError
from .fileutil import atomic_path, read_json
from .findings import FindingTemplates
from .model import RadCLIPModel
from .preprocessing import PLANES, ConfigError, PreprocessConfig, check_int, check_number, clip_processor_config, shown
from .hub import (HUB_ID, WEIGHT_FILES, Fetch, cached_snapshot, first_line, hub_cache, looks_like_path,
                  offline_mode)
from .presets import DEFAULT_MODEL, RADCLIP_FILE, RADCLIP_REPO, resolve_preset

log = logging.getLogger("RadCLIPCore")

RADCLIP_CONFIG = "radclip_config.json"
PROCESSOR_CONFIG = "preprocessor_config.json"
FORMAT_VERSION = 1
# what reading a damaged zip, pickle or index file raises (the parsers trip over whatever they meet)
_DAMAGED = (EOFError, LookupError, OSError, RuntimeError, TypeError, AttributeError, ValueError, struct.error)


def load_model(source: str | os.PathLike = DEFAULT_MODEL, device="auto", precision="auto", *,
               offline: bool | None = None, config=None, pooling: str | None = None,
               cache_dir=None, batch_size: int | None = None) -> RadCLIPModel:
    """Load a model from any source (see the module docstring).

    `config`: the CLIP architecture for a `.pth` state_dict (default: bundled ViT-L/14).
    `pooling`: None = the adapter if the model has one, else mean; "mean" forces the paper's
    global-average-pooling baseline.
    """
    if pooling not in (None, "mean", "adapter"):
        raise RadCLIPError(f"unknown pooling '{pooling}': use mean or adapter")
    resolve_precision(precision, resolve_device(device))  # a bad choice fails before any weights are read
    source = resolve_preset(source)
    offline = offline_mode(offline)
    kwargs = dict(device=device, precision=precision, batch_size=batch_size)
    path = Path(os.path.expanduser(str(source)))
    if str(source) == f"{RADCLIP_REPO}/{RADCLIP_FILE}" and not path.exists():
        return _load_state_dict(_hub_file(RADCLIP_REPO, RADCLIP_FILE, offline, cache_dir), config, source, kwargs,
                                pooling)
    if path.exists():
        if path.is_file():
            return _load_state_dict(path, config, str(source), kwargs, pooling)
        if (path / RADCLIP_CONFIG).exists():
            return _with_pooling(_load_radclip_dir(path, kwargs, pooling), pooling)
        return _with_pooling(_load_hf_dir(path, kwargs), pooling)
    if looks_like_path(str(source)):
        raise RadCLIPError(f"model not found: {source}")
    if not HUB_ID.match(str(source)):
        raise RadCLIPError(f"model '{source}' is neither a local folder/file nor a Hugging Face id like 'org/name'")
    return _with_pooling(_load_hub(str(source), offline, cache_dir, kwargs), pooling)


def model_preprocessing(source: str | os.PathLike = DEFAULT_MODEL, *, config=None, offline: bool | None = None,
                        cache_dir=None) -> PreprocessConfig:
    """The preprocessing a model is fed with, read from where it is recorded, without loading
    weights: a RadCLIP folder's `radclip_config.json`, a Hugging Face folder's or hub id's
    `preprocessor_config.json` (CLIP's defaults without one), CLIP's defaults for a `.pth`."""
    source = resolve_preset(source)
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir() and (path / RADCLIP_CONFIG).exists():
        meta = _read_radclip_config(path)
        with _naming_the_key(path):
            _check_format(meta)
            return _check_settings(meta, read_clip_config(path / "clip"))["preprocess"]
    if path.is_dir():
        return _processor_preprocessing(path / PROCESSOR_CONFIG, read_clip_config(path).vision_config.image_size)
    if path.is_file() or str(source) == f"{RADCLIP_REPO}/{RADCLIP_FILE}":
        return clip_processor_config(read_clip_config(config or "clip-vit-large-patch14").vision_config.image_size)
    if looks_like_path(str(source)) or not HUB_ID.match(str(source)):
        raise RadCLIPError(f"model not found: {source}")
    folder = cached_snapshot(str(source), cache_dir)
    if folder is not None:  # what load_model reads: the cached folder, as it is (no download)
        return _processor_preprocessing(folder / PROCESSOR_CONFIG, read_clip_config(folder).vision_config.image_size)
    size = read_clip_config(_hub_file(str(source), "config.json", offline_mode(offline), cache_dir)).vision_config.image_size
    processor = _optional_hub_file(str(source), PROCESSOR_CONFIG, cache_dir)  # as _load_hub fetches it
    return _processor_preprocessing(processor, size)


def _with_pooling(model: RadCLIPModel, pooling):
    if pooling == "adapter" and model.adapter is None:
        raise RadCLIPError(f"'{model.source}' has no trained slice-pooling adapter; use pooling='mean'")
    return model


# --------------------------------------------------------------------------- source 1
def _load_hf_dir(path: Path, kwargs, source=None) -> RadCLIPModel:
    clip, tokenizer = _load_clip_folder(path)
    preprocess = _processor_preprocessing(path / PROCESSOR_CONFIG, clip.config.vision_config.image_size)
    return RadCLIPModel(clip, tokenizer, preprocess=preprocess, source=source or str(path), **kwargs)


def _processor_preprocessing(file: Path | None, image_size: int) -> PreprocessConfig:
    """A Hugging Face CLIP model is fed as its `preprocessor_config.json` says (CLIP's defaults
    without one), on 8-bit images: as it was trained."""
    if file is None or not file.exists():
        return clip_processor_config(image_size)
    data = read_json(file, f"'{file}'")
    if not isinstance(data, dict):
        raise RadCLIPError(f"'{file}' must hold a JSON object, got {shown(data)}")
    try:
        return clip_processor_config(image_size, data)
    except ConfigError as exc:
        raise RadCLIPError(f"'{file}': {exc}") from None


def _require_files(path: Path):
    missing = [] if (path / "config.json").exists() else ["config.json"]
    if not any((path / f).exists() for f in WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        raise RadCLIPError(f"model folder '{path}' is missing {', '.join(missing)} "
                           "(expected a CLIPModel.save_pretrained folder or a RadCLIP model folder)")


def _load_clip_folder(path: Path, config=None):
    """(CLIPModel, tokenizer) of a save_pretrained folder; `config`: its already checked config."""
    _require_files(path)
    config = config or read_clip_config(path)
    clip = _from_pretrained(str(path), config, path)
    return clip, _tokenizer_for(path, clip)


def _from_pretrained(name: str, config, where, **hub):
    """`CLIPModel.from_pretrained`, refusing weights that do not fit the config: transformers would
    fill missing or mis-shaped ones with random numbers and only log it."""
    try:
        clip, info = CLIPModel.from_pretrained(name, config=config, ignore_mismatched_sizes=True,
                                               output_loading_info=True, **hub)
    except SafetensorError as exc:
        raise RadCLIPError(f"cannot read the weights in '{where}': model.safetensors is corrupt or truncated "
                           f"({first_line(exc)}); copy or download it again") from None
    except pickle.UnpicklingError as exc:  # pytorch_model.bin, read weights-only by transformers
        raise RadCLIPError(f"refusing to load the weights in '{where}': they are not a plain weights file "
                           f"({_unpickling_reason(exc)})") from None
    except _DAMAGED as exc:
        detail = first_line(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {first_line(exc)}"
        fix = ("the download failed or its files are damaged; try again" if hub else
               "its files are damaged or incomplete; copy or download them again")
        raise RadCLIPError(f"cannot load the CLIP model in '{where}' ({detail}): {fix}") from None
    problem = _mismatch_text(sorted(info["missing_keys"]), sorted(info["unexpected_keys"]),
                             sorted(k for k, *_ in info["mismatched_keys"]))
    if problem:
        raise RadCLIPError(f"the weights in '{where}' do not match its config.json: {problem}")
    return clip


def _tokenizer_for(path: Path, clip):
    """The folder's own tokenizer; if it has none, the bundled CLIP BPE (same vocabulary size)."""
    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise RadCLIPError(f"cannot load the tokenizer in '{path}': {first_line(exc)}") from None
    else:
        log.info("'%s' has no tokenizer files; using the bundled CLIP tokenizer", path)
        tokenizer = bundled_tokenizer()
    return _fit_tokenizer(tokenizer, clip, path)


def _fit_tokenizer(tokenizer, clip, where):
    tokenizer.model_max_length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
    _check_eos(clip.config, tokenizer, where)
    return tokenizer


def _check_eos(config, tokenizer, where):
    tc = config.text_config
    if tc.vocab_size != len(tokenizer):
        raise RadCLIPError(f"'{where}': tokenizer has {len(tokenizer)} tokens, text model expects {tc.vocab_size}")
    if tc.eos_token_id not in (2, tokenizer.eos_token_id):  # 2 = HF's legacy "argmax" pooling
        raise RadCLIPError(
            f"'{where}': text config eos_token_id {tc.eos_token_id} differs from the tokenizer's "
            f"{tokenizer.eos_token_id}; text pooling would read the wrong token")


# --------------------------------------------------------------------------- source 2
def _load_hub(repo: str, offline: bool, cache_dir, kwargs) -> RadCLIPModel:
    folder = cached_snapshot(repo, cache_dir)
    if folder is not None:  # cached: loaded as a local folder, no network at all
        return _load_hf_dir(folder, kwargs, source=repo)
    fetch = Fetch.model(repo, cache_dir)
    fetch.check_possible(offline)
    config = read_clip_config(fetch.download(repo, "config.json"))  # checked before the big download
    clip = _from_pretrained(repo, config, repo, cache_dir=cache_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(repo, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise RadCLIPError(f"cannot load the tokenizer of '{repo}': {first_line(exc)}") from None
    processor = _optional_hub_file(repo, PROCESSOR_CONFIG, cache_dir)
    return RadCLIPModel(clip, _fit_tokenizer(tokenizer, clip, repo), source=repo, **kwargs,
                        preprocess=_processor_preprocessing(processor, clip.config.vision_config.image_size))


def _optional_hub_file(repo, filename, cache_dir) -> Path | None:
    """A small file the repo may not have (then None); the hub was just reached for the weights."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, cache_dir=hub_cache(cache_dir)))
    except EntryNotFoundError:
        return None
    except OSError as exc:  # the hub's HTTP errors are OSErrors
        raise RadCLIPError(f"cannot download '{filename}' of '{repo}': {first_line(exc)}") from None


def _hub_file(repo, filename, offline, cache_dir) -> Path:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=cache_dir)
    if isinstance(found, str):  # cached: no network at all
        return Path(found)
    fetch = Fetch.file(repo, filename, cache_dir)
    fetch.check_possible(offline)
    return fetch.download(repo, filename)


# --------------------------------------------------------------------------- source 3
def _load_radclip_dir(path: Path, kwargs, pooling) -> RadCLIPModel:
    meta = _read_radclip_config(path)
    with _naming_the_key(path):
        _check_format(meta)
    _require_files(path / "clip")
    clip_config = read_clip_config(path / "clip")
    with _naming_the_key(path):  # the whole file is checked before anything is built
        spec = _check_settings(meta, clip_config)
    adapter_file, head_file = path / "adapter.safetensors", path / "anatomy_head.safetensors"
    for needed, file in ((spec["pooling"] == "adapter", adapter_file), (spec["anatomy_head"], head_file)):
        if needed and not file.exists():
            raise RadCLIPError(f"model folder '{path}' is missing {file.name}")
    clip, tokenizer = _load_clip_folder(path / "clip", clip_config)
    adapter = None
    if spec["pooling"] == "adapter" and pooling != "mean":
        adapter = SlicePoolingAdapter(spec["adapter"])
        _load_weights(adapter, adapter_file, "adapter")
    head = None
    if spec["anatomy_head"]:
        cfg = spec["anatomy_head"]
        head = AnatomyHead(cfg["dim"], cfg["labels"], {int(k): v for k, v in cfg.get("names", {}).items()},
                           pooling=cfg.get("pooling", "mean"))
        _load_weights(head, head_file, "anatomy_head")
    card = (path / "README.md").read_text(encoding="utf-8", errors="replace") if (path / "README.md").exists() else None
    return RadCLIPModel(clip, tokenizer, adapter=adapter, anatomy_head=head, preprocess=spec["preprocess"],
                        temperature=spec["temperature"], plane=spec["plane"], source=str(path), card=card,
                        finding_templates=spec["finding_templates"], **kwargs)


def _read_radclip_config(path: Path) -> dict:
    meta = read_json(path / RADCLIP_CONFIG, f"model folder '{path}': {RADCLIP_CONFIG}")
    if not isinstance(meta, dict):
        raise RadCLIPError(f"model folder '{path}': {RADCLIP_CONFIG} must hold a JSON object, got {shown(meta)}")
    return meta


@contextmanager
def _naming_the_key(path: Path):
    """Setting errors start with the key ('preprocessing.std'); say which file holds it."""
    try:
        yield
    except ConfigError as exc:
        raise RadCLIPError(f"model folder '{path}': {RADCLIP_CONFIG} key {exc}") from None


def _required(meta: dict, key: str, section: str = ""):
    if key not in meta:
        raise ConfigError(f"'{section}{key}' is missing")
    return meta[key]


def _check_format(meta: dict):
    if _required(meta, "format") != "radclip":
        raise ConfigError(f"'format' must be \"radclip\", got {shown(meta['format'])}: not a RadCLIP model folder")
    version = check_int("format_version", _required(meta, "format_version"))
    if version > FORMAT_VERSION:
        raise ConfigError(f"'format_version' is {version}, newer than this RadCLIPCore reads ({FORMAT_VERSION}): "
                          "update RadCLIPCore")


def _check_settings(meta: dict, clip_config) -> dict:
    """Every setting of radclip_config.json, checked for type and range and against the CLIP config
    in clip/ (a wrong one gives wrong answers or a crash later); raises ConfigError naming the key."""
    dim = clip_config.projection_dim
    pooling = _required(meta, "pooling")
    if pooling not in ("mean", "adapter"):  # anything else would silently drop the adapter
        raise ConfigError(f"'pooling' must be \"mean\" or \"adapter\", got {shown(pooling)}")
    adapter = meta.get("adapter")
    if adapter is None and pooling == "adapter":
        raise ConfigError("'adapter' is missing: 'pooling' is \"adapter\"")
    if adapter is not None:
        adapter = AdapterConfig.from_dict(adapter)
        for key, value in (("adapter.dim", adapter.dim), ("adapter.out_dim", adapter.out_dim or adapter.dim)):
            if value != dim:
                raise ConfigError(f"'{key}' must equal the CLIP projection_dim {dim}, got {value}")
    preprocess = PreprocessConfig.from_dict(_required(meta, "preprocessing"))
    size = clip_config.vision_config.image_size
    if preprocess.image_size != size:  # the vision tower takes no other size
        raise ConfigError(f"'preprocessing.image_size' must equal the vision tower's image_size {size}, "
                          f"got {preprocess.image_size}")
    temperature = check_number("temperature", _required(meta, "temperature"), positive=True)
    plane = meta.get("plane", "auto")
    if plane not in ("auto",) + PLANES:
        raise ConfigError(f"'plane' must be auto, axial, coronal or sagittal, got {shown(plane)}")
    if "embedding_dim" in meta and check_int("embedding_dim", meta["embedding_dim"]) != dim:
        raise ConfigError(f"'embedding_dim' must equal the CLIP projection_dim {dim}, got {meta['embedding_dim']}")
    head = meta.get("anatomy_head")
    if head is not None:
        _check_anatomy_head(head, dim)
    templates = meta.get("finding_templates")
    if templates is not None:
        try:
            templates = FindingTemplates.from_dict(templates)
        except RadCLIPError as exc:
            raise ConfigError(f"'finding_templates': {exc}") from None
    return {"pooling": pooling, "adapter": adapter, "preprocess": preprocess, "temperature": temperature,
            "plane": plane, "anatomy_head": head, "finding_templates": templates}


def _check_anatomy_head(head, dim):
    if not isinstance(head, dict):
        raise ConfigError(f"'anatomy_head' must be an object with dim, labels and names, got {shown(head)}")
    if check_int("anatomy_head.dim", _required(head, "dim", "anatomy_head.")) != dim:
        raise ConfigError(f"'anatomy_head.dim' must equal the CLIP projection_dim {dim}, got {head['dim']}")
    labels = head.get("labels")
    if (not isinstance(labels, list) or not labels or len(set(map(repr, labels))) != len(labels)
            or any(isinstance(v, bool) or not isinstance(v, int) for v in labels)):
        raise ConfigError(f"'anatomy_head.labels' must be a non-empty list of distinct integers, got {shown(labels)}")
    if head.get("pooling", "mean") not in ANATOMY_POOLINGS:  # folders before attention pooling: the mean
        raise ConfigError(f"'anatomy_head.pooling' must be one of {', '.join(ANATOMY_POOLINGS)}, "
                          f"got {shown(head['pooling'])}")
    names = head.get("names", {})
    if not isinstance(names, dict) or not all(re.fullmatch(r"-?\d+", k) and isinstance(v, str)
                                              for k, v in names.items()):
        raise ConfigError(f"'anatomy_head.names' must map label numbers to names (e.g. {{\"1\": \"lung\"}}), "
                          f"got {shown(names)}")


def _load_weights(module: torch.nn.Module, file: Path, key: str):
    """A small module's weights (adapter, anatomy head), which must fit the shapes its settings give."""
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise RadCLIPError(f"cannot read '{file}': corrupt or truncated ({first_line(exc)}); "
                           "copy the model folder again") from None
    problem = _mismatch({k: v.shape for k, v in module.state_dict().items()}, state)
    if problem:
        raise RadCLIPError(f"'{file}' does not match the '{key}' settings in {RADCLIP_CONFIG}: {problem}")
    module.load_state_dict(state)


def save_model(model: RadCLIPModel, path, card: str | None = None, training: dict | None = None) -> Path:
    """Write a RadCLIP model folder atomically (a crash leaves the previous folder intact).

    `card`: text for the model card (how it was trained); `training`: facts recorded in the JSON.
    """
    path = Path(path)
    if is_quantized(model.clip):
        raise RadCLIPError("this model runs in int8 (quantised weights): save it from a model loaded with "
                           "precision fp32")
    with atomic_path(path) as tmp:
        tmp.mkdir()
        clip = model.clip
        clip.save_pretrained(str(tmp / "clip"))
        model.tokenizer.save_pretrained(str(tmp / "clip"))
        meta = {
            "format": "radclip",
            "format_version": FORMAT_VERSION,
            "pooling": model.pooling,
            "adapter": model.adapter.config.to_dict() if model.adapter is not None else None,
            "preprocessing": model.preprocess.to_dict(),
            "temperature": model.temperature,
            "plane": model.plane,
            "embedding_dim": model.dim,
            "training": training or {},
        }
        for name, module in (("adapter", model.adapter), ("anatomy_head", model.anatomy_head)):
            if module is not None:
                state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
                save_file(state, str(tmp / f"{name}.safetensors"))
        if model.anatomy_head is not None:
            meta["anatomy_head"] = model.anatomy_head.config()
        if getattr(model, "finding_templates", None) is not None:
            meta["finding_templates"] = model.finding_templates.to_dict()
        (tmp / RADCLIP_CONFIG).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_model_card(model, meta, card), encoding="utf-8")
    return path


def _model_card(model, meta, card) -> str:
    v = model.clip.config.vision_config
    lines = [
        "# RadCLIP model", "",
        card.strip() if card else "No training notes were given.", "",
        "## What is in this folder",
        "- `clip/`: the CLIP image and text encoders (Hugging Face `CLIPModel`, safetensors) and tokenizer.",
        f"- pooling over slices: **{meta['pooling']}**"
        + (" (`adapter.safetensors`: slice-pooling adapter, RadCLIP)" if meta["pooling"] == "adapter"
           else " (global average pooling)"),
        f"- vision tower: {v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size}, "
        f"{v.image_size} px; embedding dim {meta['embedding_dim']}",
        f"- temperature {meta['temperature']:.4g}; plane policy `{meta['plane']}`; preprocessing "
        f"`{json.dumps(meta['preprocessing'])}`", "",
        "Load with `RadCLIPCore.load_model(\"<this folder>\")`. Research use only; not a medical device.", "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- source 4
def _load_state_dict(path: Path, config, source, kwargs, pooling) -> RadCLIPModel:
    state = _read_weights(path)
    tokenizer = bundled_tokenizer()
    clip_config = align_token_ids(read_clip_config(config or "clip-vit-large-patch14"), tokenizer)
    with torch.device("meta"):  # no random init of ~430M weights: they are replaced right away
        clip = CLIPModel(clip_config)
    problem = _mismatch({k: v.shape for k, v in clip.state_dict().items()}, state)
    if problem:
        raise RadCLIPError(f"'{path.name}' does not match the {_arch_name(clip_config)} CLIP architecture: "
                           f"{problem}; pass the matching config")
    clip.load_state_dict(state, assign=True)
    for module in clip.modules():  # non-persistent buffers are not in a state_dict: rebuild them
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:
            module.register_buffer("position_ids", torch.arange(ids.shape[-1]).expand((1, -1)), persistent=False)
    leftover = [n for n, t in list(clip.named_parameters()) + list(clip.named_buffers()) if t.is_meta]
    if leftover:
        raise RadCLIPError(f"'{path.name}': weights {leftover[:3]} were not set")
    clip.eval()
    return _with_pooling(RadCLIPModel(clip, tokenizer, source=str(source), **kwargs), pooling)


def _arch_name(config) -> str:
    v = config.vision_config
    return f"ViT ({v.num_hidden_layers} layers, width {v.hidden_size}, patch {v.patch_size})"


def _mismatch(expected: dict, state: dict) -> str | None:
    """What differs between the weights a module needs (name -> shape) and those a file holds."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != tuple(expected[k]))
    return _mismatch_text(missing, unexpected, wrong)


def _mismatch_text(missing, unexpected, wrong) -> str | None:
    if not (missing or unexpected or wrong):
        return None
    return (f"{len(missing)} missing weights {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(wrong)} of another shape {wrong[:2]}")


def _read_weights(path: Path) -> dict:
    """A state_dict from a safetensors or weights-only `torch.save` file; never runs pickled code.

    The file's first bytes say what it is, so a text file, an image or a config.json given as the
    model is named as such instead of failing somewhere inside the unpickler."""
    try:
        with path.open("rb") as f:
            head = f.read(16)
    except OSError as exc:
        raise RadCLIPError(f"cannot read '{path}': {exc.strerror or exc}") from None
    if path.name in ("config.json", RADCLIP_CONFIG):
        raise RadCLIPError(f"'{path}' holds a model's settings, not the model: pass the folder '{path.parent}'")
    if not head:
        raise RadCLIPError(f"'{path}' is empty (0 bytes): copy or download it again")
    if path.suffix == ".safetensors" or head[8:9] == b"{":  # safetensors: 8-byte header length, then JSON
        try:
            return _clean_state(load_file(str(path)))
        except (SafetensorError, OSError) as exc:
            raise RadCLIPError(f"cannot read '{path}': corrupt or not safetensors ({first_line(exc)})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip, or (legacy) a pickle
        raise RadCLIPError(f"'{path}' is not a model file: pass a model folder, a .pth/.pt PyTorch state_dict "
                           "or a .safetensors file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: keep one line
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RadCLIPError(f"refusing to load '{path.name}': it is not a plain weights file "
                           f"({_unpickling_reason(exc)}); only weights-only checkpoints are loaded") from None
    except _DAMAGED as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt, truncated or not a PyTorch file "
                           f"({first_line(exc)})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise RadCLIPError(f"'{path.name}' holds no state_dict of tensors")
    return _clean_state(obj)


def _clean_state(obj: dict) -> dict:
    state = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key  # saved from a DDP wrapper
        if key.endswith("position_ids"):  # a buffer older transformers saved; rebuilt by the model
            continue
        state[key] = value
    return state


def _unpickling_reason(exc) -> str:
    """torch's weights-only refusal is a paragraph; the line naming the refused object or opcode says it."""
    lines = [line.strip() for line in str(exc).splitlines()]
    return next((line.rstrip(".") for line in lines if "unsupported" in line.lower()), first_line(exc))

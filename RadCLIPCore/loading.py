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
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapter import AdapterConfig, SlicePoolingAdapter
from .encoders import align_token_ids, bundled_tokenizer, read_clip_config
from .errors import RadCLIPError
from .fileutil import atomic_path
from .model import RadCLIPModel
from .preprocessing import PreprocessConfig

log = logging.getLogger("RadCLIPCore")

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
RADCLIP_REPO, RADCLIP_FILE = "zluvolyote/RadCLIP", "RadCLIP.pth"
PRESETS = {"clip": DEFAULT_MODEL, "radclip": f"{RADCLIP_REPO}/{RADCLIP_FILE}"}
RADCLIP_CONFIG = "radclip_config.json"
FORMAT_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


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
    source = PRESETS.get(str(source), source)
    offline = _offline(offline)
    kwargs = dict(device=device, precision=precision, batch_size=batch_size)
    path = Path(os.path.expanduser(str(source)))
    if str(source) == PRESETS["radclip"] and not path.exists():
        return _load_state_dict(_hub_file(RADCLIP_REPO, RADCLIP_FILE, offline, cache_dir), config, source, kwargs,
                                pooling)
    if path.exists():
        if path.is_file():
            return _load_state_dict(path, config, str(source), kwargs, pooling)
        if (path / RADCLIP_CONFIG).exists():
            return _load_radclip_dir(path, kwargs, pooling)
        return _with_pooling(_load_hf_dir(path, kwargs), pooling)
    if _looks_like_path(str(source)):
        raise RadCLIPError(f"model not found: {source}")
    if not _HUB_ID.match(str(source)):
        raise RadCLIPError(f"model '{source}' is neither a local folder/file nor a Hugging Face id like 'org/name'")
    return _with_pooling(_load_hub(str(source), offline, cache_dir, kwargs), pooling)


def _offline(offline):
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_path(source: str) -> bool:
    """A missing local path (to report as not found) rather than a hub id."""
    return (source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or "\\" in source
            or source.lower().endswith((".pth", ".pt", ".bin", ".safetensors", ".json")))


def _with_pooling(model: RadCLIPModel, pooling):
    if pooling == "adapter" and model.adapter is None:
        raise RadCLIPError(f"'{model.source}' has no trained slice-pooling adapter; use pooling='mean'")
    return model


# --------------------------------------------------------------------------- source 1
def _load_hf_dir(path: Path, kwargs, source=None) -> RadCLIPModel:
    from transformers import CLIPModel

    missing = [] if (path / "config.json").exists() else ["config.json"]
    if not any((path / f).exists() for f in _WEIGHT_FILES):
        missing.append("model.safetensors")
    if missing:
        raise RadCLIPError(f"model folder '{path}' is missing {', '.join(missing)} "
                           "(expected a CLIPModel.save_pretrained folder or a RadCLIP model folder)")
    try:
        clip = CLIPModel.from_pretrained(str(path))
    except (OSError, ValueError, RuntimeError) as exc:
        raise RadCLIPError(f"cannot load the CLIP model in '{path}': {_first_line(exc)}") from None
    return RadCLIPModel(clip, _tokenizer_for(path, clip), source=source or str(path), **kwargs)


def _tokenizer_for(path: Path, clip):
    """The folder's own tokenizer; if it has none, the bundled CLIP BPE (same vocabulary size)."""
    from transformers import CLIPTokenizer

    if any((path / f).exists() for f in ("tokenizer.json", "vocab.json")):
        try:
            tokenizer = CLIPTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise RadCLIPError(f"cannot load the tokenizer in '{path}': {_first_line(exc)}") from None
    else:
        log.info("'%s' has no tokenizer files; using the bundled CLIP tokenizer", path)
        tokenizer = bundled_tokenizer()
    tokenizer.model_max_length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
    _check_eos(clip.config, tokenizer, path)
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
    from transformers import CLIPModel, CLIPTokenizer

    try:
        clip = CLIPModel.from_pretrained(repo, local_files_only=offline, cache_dir=cache_dir)
        tokenizer = CLIPTokenizer.from_pretrained(repo, local_files_only=offline, cache_dir=cache_dir)
    except (OSError, ValueError) as exc:
        raise RadCLIPError(_hub_help(repo, offline, cache_dir, exc)) from None
    tokenizer.model_max_length = min(tokenizer.model_max_length, clip.config.text_config.max_position_embeddings)
    _check_eos(clip.config, tokenizer, repo)
    return RadCLIPModel(clip, tokenizer, source=repo, **kwargs)


def _hub_cache(cache_dir) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_help(repo, offline, cache_dir, exc) -> str:
    why = "downloads are off (offline mode)" if offline else f"it could not be downloaded ({_first_line(exc)[:160]})"
    return (f"model '{repo}' is not in the Hugging Face cache ({_hub_cache(cache_dir)}) and {why}; "
            f"on a machine with internet run `hf download {repo}` and copy that cache folder here "
            "(or set HF_HOME), or pass a local model folder")


def _hub_file(repo, filename, offline, cache_dir) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir, local_files_only=offline))
    except Exception as exc:  # huggingface_hub raises many types here (network, cache, auth)
        raise RadCLIPError(
            f"'{filename}' of '{repo}' is not in the Hugging Face cache ({_hub_cache(cache_dir)}) and "
            f"{'downloads are off (offline mode)' if offline else 'could not be downloaded'}; download it from "
            f"https://huggingface.co/{repo} and pass its path ({_first_line(exc)[:120]})") from None


# --------------------------------------------------------------------------- source 3
def _load_radclip_dir(path: Path, kwargs, pooling) -> RadCLIPModel:
    try:
        meta = json.loads((path / RADCLIP_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RadCLIPError(f"cannot read '{path / RADCLIP_CONFIG}': {exc}") from None
    if meta.get("format") != "radclip" or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RadCLIPError(f"'{path}' is not a RadCLIP model folder this version can read "
                           f"(format {meta.get('format')!r} version {meta.get('format_version')!r})")
    adapter_file = path / "adapter.safetensors"
    wants_adapter = meta.get("pooling") == "adapter" and pooling != "mean"
    if meta.get("pooling") == "adapter" and not adapter_file.exists():
        raise RadCLIPError(f"model folder '{path}' is missing adapter.safetensors")
    base = _load_hf_dir(path / "clip", kwargs, source=str(path))
    adapter = None
    if wants_adapter:
        adapter = SlicePoolingAdapter(AdapterConfig(**meta["adapter"]))
        try:
            adapter.load_state_dict(load_file(str(adapter_file)))
        except Exception as exc:  # safetensors header errors, shape mismatches
            raise RadCLIPError(f"cannot load '{adapter_file}': {_first_line(exc)}") from None
    head = None
    if meta.get("anatomy_head"):
        from .anatomy import AnatomyHead

        cfg = meta["anatomy_head"]
        head = AnatomyHead(cfg["dim"], cfg["labels"], {int(k): v for k, v in cfg.get("names", {}).items()})
        head_file = path / "anatomy_head.safetensors"
        try:
            head.load_state_dict(load_file(str(head_file)))
        except Exception as exc:
            raise RadCLIPError(f"cannot load '{head_file}': {_first_line(exc)}") from None
    card = (path / "README.md").read_text(encoding="utf-8") if (path / "README.md").exists() else None
    return RadCLIPModel(base.clip, base.tokenizer, adapter=adapter, anatomy_head=head,
                        preprocess=PreprocessConfig.from_dict(meta["preprocessing"]),
                        temperature=float(meta["temperature"]), plane=meta.get("plane", "auto"),
                        source=str(path), card=card, **kwargs)


def save_model(model: RadCLIPModel, path, card: str | None = None, training: dict | None = None) -> Path:
    """Write a RadCLIP model folder atomically (a crash leaves the previous folder intact).

    `card`: text for the model card (how it was trained); `training`: facts recorded in the JSON.
    """
    path = Path(path)
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
    from transformers import CLIPModel

    state = _read_weights(path)
    tokenizer = bundled_tokenizer()
    clip_config = align_token_ids(read_clip_config(config or "clip-vit-large-patch14"), tokenizer)
    with torch.device("meta"):  # no random init of ~430M weights: they are replaced right away
        clip = CLIPModel(clip_config)
    expected = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(state) & set(expected) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise RadCLIPError(
            f"'{path.name}' does not match the {_arch_name(clip_config)} CLIP architecture: "
            f"{len(missing)} missing weights {missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}, "
            f"{len(wrong)} of another shape {wrong[:2]}; pass the matching config")
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


def _read_weights(path: Path) -> dict:
    """A state_dict from `.safetensors` or a weights-only `torch.save` file; never runs pickled code."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RadCLIPError(f"cannot read '{path}': corrupt or not safetensors ({_first_line(exc)})") from None
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: keep one line
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise RadCLIPError(
            f"refusing to load '{path.name}': it is not a plain weights file (its pickle asks to run or build "
            f"arbitrary objects: {_first_line(exc)[:120]}); only weights-only checkpoints are loaded") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RadCLIPError(f"cannot read '{path}': corrupt, truncated or not a PyTorch file ({_first_line(exc)[:160]})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RadCLIPError(f"'{path.name}' holds no state_dict of tensors")
    state = {}
    for key, value in obj.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if key.endswith("position_ids"):  # a buffer older transformers saved; rebuilt by the model
            continue
        state[key] = value
    return state


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

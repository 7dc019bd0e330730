"""CLIP's two encoders (HF transformers `CLIPModel`) and the configs/tokenizer bundled with us.

Image encoder = vision tower + visual projection; text encoder = text tower + text projection.
We read the pooled outputs and apply the projections ourselves, so the code does not depend on
whether `get_image_features` returns a tensor or an output object (it changed in transformers 5).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .errors import RadCLIPError

RESOURCES = Path(__file__).resolve().parent / "resources"
TOKENIZER_DIR = RESOURCES / "tokenizer"
CONFIG_DIR = RESOURCES / "configs"
BUNDLED_CONFIGS = tuple(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
TEXT_MAX_TOKENS = 77


def bundled_tokenizer() -> CLIPTokenizer:
    """OpenAI's CLIP BPE tokenizer (49,408 tokens), from files inside the package."""
    # transformers 5: vocab/merges must be passed positionally (as keywords it builds a 2-token vocab)
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=TEXT_MAX_TOKENS)


def bundled_clip_config(name: str) -> CLIPConfig:
    """One of `BUNDLED_CONFIGS` (e.g. `clip-vit-large-patch14`, the paper's architecture)."""
    if name not in BUNDLED_CONFIGS:
        raise RadCLIPError(f"no bundled config '{name}': choose one of {', '.join(BUNDLED_CONFIGS)}")
    return CLIPConfig.from_dict(json.loads((CONFIG_DIR / f"{name}.json").read_text()))


def read_clip_config(config) -> CLIPConfig:
    """A `CLIPConfig`, the name of a bundled config, or a path to a `config.json`."""
    if isinstance(config, CLIPConfig):
        return config
    if str(config) in BUNDLED_CONFIGS:
        return bundled_clip_config(str(config))
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    try:
        return CLIPConfig.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise RadCLIPError(f"cannot read CLIP config '{config}': {exc}") from None


def align_token_ids(config: CLIPConfig, tokenizer) -> CLIPConfig:
    """Make the text config's special ids those of the tokenizer.

    A `CLIPTextConfig` whose `eos_token_id` differs from the tokenizer's makes the text tower pool
    the wrong position (silently: position 0), so this is checked, not assumed.
    """
    tc = config.text_config
    if tc.vocab_size != len(tokenizer):
        raise RadCLIPError(
            f"the tokenizer has {len(tokenizer)} tokens but the text model expects {tc.vocab_size}")
    tc.bos_token_id, tc.eos_token_id, tc.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return config


def new_clip_model(config, tokenizer=None, seed=None) -> CLIPModel:
    """A randomly initialised `CLIPModel` (tests, benchmarks, training from scratch)."""
    config = align_token_ids(read_clip_config(config), tokenizer or bundled_tokenizer())
    if seed is not None:
        torch.manual_seed(seed)
    return CLIPModel(config).eval()


def image_features(clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, projection_dim), not normalised."""
    pooled = clip.vision_model(pixel_values=pixel_values).pooler_output
    return clip.visual_projection(pooled)


def text_features(clip: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) token ids -> (N, projection_dim), not normalised."""
    pooled = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return clip.text_projection(pooled)


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def resolve_device(device="auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if _cuda_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RadCLIPError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not _cuda_available():
        raise RadCLIPError(f"device '{device}' asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RadCLIPError(f"device '{device}' asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return dev


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision, device: torch.device) -> torch.dtype:
    """`auto` = bf16 on CUDA, fp32 on CPU (bf16 on CPU only when asked for)."""
    if precision in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise RadCLIPError(f"unknown precision '{precision}': use auto, fp32, bf16 or fp16")
    return PRECISIONS[precision]

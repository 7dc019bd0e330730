"""CLIP's two encoders (HF transformers `CLIPModel`) and the configs/tokenizer bundled with us.

Image encoder = vision tower + visual projection; text encoder = text tower + text projection.
We read the pooled outputs and apply the projections ourselves, so the code does not depend on
whether `get_image_features` returns a tensor or an output object (it changed in transformers 5).
"""
from __future__ import annotations

import json
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .errors import RadCLIPError
from .fileutil import read_json
from .preprocessing import ConfigError, check_int, check_number, shown

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
    """A `CLIPConfig`, the name of a bundled config, or a path to a `config.json` (or its folder)."""
    if isinstance(config, CLIPConfig):
        return config
    if str(config) in BUNDLED_CONFIGS:
        return bundled_clip_config(str(config))
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise RadCLIPError(f"cannot read CLIP config '{config}': not found; pass a config.json, the folder "
                           f"that holds one, or a bundled name ({', '.join(BUNDLED_CONFIGS)})")
    return clip_config_from_dict(read_json(path, f"CLIP config '{path}'"), path)


# sizes the towers are built from: a string, 0 or a negative here crashes deep in torch or
# builds a model the weights do not fit
_SIZES = {"text_config": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads", "max_position_embeddings"),
          "vision_config": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                            "image_size", "patch_size")}


def clip_config_from_dict(data, where) -> CLIPConfig:
    """A checked `CLIPConfig` from the contents of a config.json; errors are one line naming the key."""
    from huggingface_hub.errors import StrictDataclassError

    def bad(message):
        return RadCLIPError(f"CLIP config '{where}' key {message}")

    if not isinstance(data, dict):
        raise RadCLIPError(f"CLIP config '{where}' must hold a JSON object, got {shown(data)}")
    model_type = data.get("model_type", "clip")
    if model_type != "clip":
        raise RadCLIPError(f"CLIP config '{where}' describes a {shown(model_type)} model, not CLIP "
                           "(model_type \"clip\"): pass a CLIP model")
    try:
        if "projection_dim" in data:
            check_int("projection_dim", data["projection_dim"])
        if "logit_scale_init_value" in data:
            check_number("logit_scale_init_value", data["logit_scale_init_value"])
        for tower, sizes in _SIZES.items():
            if not isinstance(data.get(tower), dict):
                raise ConfigError(f"'{tower}' must be an object, got {shown(data.get(tower))}")
            given = {name: check_int(f"{tower}.{name}", data[tower][name]) for name in sizes if name in data[tower]}
            if given.get("hidden_size", 0) % given.get("num_attention_heads", 1):
                raise ConfigError(f"'{tower}.num_attention_heads' must divide '{tower}.hidden_size': "
                                  f"{given['hidden_size']} is not divisible by {given['num_attention_heads']}")
        config = CLIPConfig.from_dict(data)
        v = config.vision_config
        if v.image_size < v.patch_size:
            raise ConfigError(f"'vision_config.image_size' must be at least the patch size {v.patch_size}, "
                              f"got {v.image_size}")
    except ConfigError as exc:
        raise bad(exc) from None
    except (StrictDataclassError, ValueError, TypeError) as exc:  # transformers' own checks of the rest
        raise RadCLIPError(f"CLIP config '{where}' is not valid: {_last_line(exc)}") from None
    return config


def _last_line(exc) -> str:
    """transformers' config errors say which field on their first line and what is wrong on the last."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


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


def image_features(clip: CLIPModel, pixel_values: torch.Tensor, patch_tokens: bool = False):
    """One pass of the vision tower. (N, 3, H, W) -> (N, projection_dim), not normalised; with
    `patch_tokens`, also (N, patches, projection_dim): every patch token through the tower's final
    layer norm and the projection (fVLM's anatomy pooling reads these), from the same pass."""
    out = clip.vision_model(pixel_values=pixel_values)
    pooled = clip.visual_projection(out.pooler_output)
    if not patch_tokens:
        return pooled
    return pooled, _patch_vectors(clip, out)


def patch_features(clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch tokens alone (what anatomy training reads): (N, 3, H, W) -> (N, patches, projection_dim),
    not normalised, the same vectors as `image_features(..., patch_tokens=True)[1]`."""
    return _patch_vectors(clip, clip.vision_model(pixel_values=pixel_values))


def _patch_vectors(clip, out) -> torch.Tensor:
    return clip.visual_projection(clip.vision_model.post_layernorm(out.last_hidden_state[:, 1:]))


def text_features(clip: CLIPModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T) token ids -> (N, projection_dim), not normalised."""
    pooled = clip.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return clip.text_projection(pooled)


@lru_cache(maxsize=1)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _device_choices() -> str:
    choices = ["auto", "cpu"]
    if _cuda_available():
        choices += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        choices.append("mps")
    return ", ".join(choices[:-1]) + " or " + choices[-1]


def resolve_device(device="auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if _cuda_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise RadCLIPError(f"unknown device '{device}': use {_device_choices()}") from None
    if dev.type == "cuda" and not _cuda_available():
        raise RadCLIPError(f"device '{device}' asked for, but this torch ({torch.__version__}) sees no CUDA GPU: "
                           f"use {_device_choices()}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RadCLIPError(f"device '{device}' asked for, but only {torch.cuda.device_count()} GPU(s) are visible: "
                           f"use {_device_choices()}")
    # torch names more device types than we can compute on here ('meta' holds no data; xpu, hpu,
    # mps... need their backend): refuse them now, not with a torch error halfway through loading
    if dev.type not in ("cpu", "cuda") and not (dev.type == "mps" and torch.backends.mps.is_available()):
        raise RadCLIPError(f"device '{device}' cannot run the model here: use {_device_choices()}")
    return dev


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.float32}
# Precisions that `auto` may pick on a CPU: each met the README's fidelity bar (embedding cosine to fp32
# >= 0.995 and the same top-1 on every test volume, on trained models) in benchmarks/bench_precision.py.
CPU_AUTO_VERIFIED = ("bf16", "int8")


def cpu_capabilities() -> dict:
    """What this CPU runs natively, as torch reads it (cpuid; nothing is timed)."""
    def flag(name):
        probe = getattr(torch.cpu, name, None)
        try:
            return bool(probe()) if probe is not None else False
        except RuntimeError:
            return False

    return {"avx2": flag("_is_avx2_supported"), "avx512": flag("_is_avx512_supported"),
            "avx512_bf16": flag("_is_avx512_bf16_supported"), "amx": flag("_is_amx_tile_supported"),
            "vnni": flag("_is_vnni_supported"),
            "int8_kernels": any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))}


CPU_PRECISION_ENV = "RADCLIP_CPU_PRECISION"  # pins what `auto` means on a CPU: fp32, bf16 or int8


def auto_cpu_precision(capabilities: dict | None = None) -> str:
    """`auto` on a CPU: what $RADCLIP_CPU_PRECISION pins, if set; else
    - bf16 where the CPU has AMX (its bf16 matrix unit: 4-5x fp32 on ViT-L/14);
    - else int8 (dynamic quantisation of the vision tower's Linear layers) where torch has its x86
      int8 kernels and the CPU AVX2 or better (ViT-L/14: 4.2x fp32 with AVX512-BF16 and VNNI, where
      bf16 gave 1.8x; 1.9x on an AVX2-only CPU, where emulated bf16 is 5-7x slower than fp32);
    - else bf16 where the CPU has AVX512-BF16;
    - else fp32.
    Only precisions in CPU_AUTO_VERIFIED (they met the fidelity bar) are picked."""
    pinned = os.environ.get(CPU_PRECISION_ENV, "").strip()
    if pinned:
        if pinned not in ("fp32", "bf16", "int8"):
            raise RadCLIPError(f"{CPU_PRECISION_ENV}={pinned!r} is not a CPU precision: use fp32, bf16 or int8")
        return pinned
    caps = cpu_capabilities() if capabilities is None else capabilities
    bf16, int8 = "bf16" in CPU_AUTO_VERIFIED, "int8" in CPU_AUTO_VERIFIED
    if caps.get("amx") and bf16:
        return "bf16"
    if caps.get("int8_kernels") and (caps.get("avx2") or caps.get("avx512")) and int8:
        return "int8"
    if caps.get("avx512_bf16") and bf16:
        return "bf16"
    return "fp32"


def resolve_precision(precision, device: torch.device) -> str:
    """The precision a model runs in: `auto` = bf16 on CUDA, `auto_cpu_precision()` on a CPU, fp32
    elsewhere. int8 is the CPU's only (its kernels are x86/ARM CPU kernels)."""
    if precision in (None, "auto"):
        return "bf16" if device.type == "cuda" else auto_cpu_precision() if device.type == "cpu" else "fp32"
    if precision not in PRECISIONS:
        raise RadCLIPError(f"unknown precision '{precision}': use auto, fp32, bf16, fp16 or int8")
    if precision == "int8" and device.type != "cpu":
        raise RadCLIPError(f"precision int8 runs on the CPU only, not on '{device}': use fp32, bf16 or fp16 there")
    if precision == "int8" and not cpu_capabilities()["int8_kernels"]:
        raise RadCLIPError("precision int8 needs torch's x86 int8 kernels, which this torch build lacks: use fp32 or bf16")
    return precision


def quantize_vision_int8(clip: CLIPModel) -> CLIPModel:
    """Dynamic int8 quantisation of the vision tower's Linear layers (weights int8 per tensor,
    activations quantised per batch); the projections and the text tower stay fp32. In place; CPU only."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch marks its quantized tensor API deprecated: library noise
        warnings.simplefilter("ignore")
        clip.vision_model = quantize_dynamic(clip.vision_model, {torch.nn.Linear}, dtype=torch.qint8)
    return clip


def is_quantized(module: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())

"""RadCLIPCore: radiology vision-language models (RadCLIP) without any Slicer dependency.

    from RadCLIPCore import load_model
    model = load_model("openai/clip-vit-large-patch14")
    emb = model.embed_volume("ct.nii.gz", max_slices=64)
    model.rank(emb, ["Chest CT", "Brain MRI", "A puppy"])

The names below are imported on first use (PEP 562), so that a light submodule such as
`RadCLIPCore.protocol` (numpy only) can be used where torch is not wanted: Slicer's GUI process.
"""
import importlib

__version__ = "0.1.0"
_EXPORTS = {
    "AdapterConfig": "adapter", "SlicePoolingAdapter": "adapter", "mean_pool": "adapter",
    "RadCLIPError": "errors",
    "Volume": "volume_io", "read_volume": "volume_io",
    "DEFAULT_MODEL": "presets", "load_model": "loading", "save_model": "loading",
    "RadCLIPModel": "model", "RankedPrompt": "model", "VolumeEmbedding": "model",
    "PreprocessConfig": "preprocessing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'RadCLIPCore' has no attribute '{name}'")


def __dir__():
    return sorted(list(globals()) + __all__)

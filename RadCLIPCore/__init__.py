"""RadCLIPCore: radiology vision-language models (RadCLIP) without any Slicer dependency.

    from RadCLIPCore import load_model
    model = load_model("openai/clip-vit-large-patch14")
    emb = model.embed_volume("ct.nii.gz", max_slices=64)
    model.rank(emb, ["Chest CT", "Brain MRI", "A puppy"])
"""
from .adapter import AdapterConfig, SlicePoolingAdapter, mean_pool
from .errors import RadCLIPError
from .io import Volume, read_volume
from .loading import DEFAULT_MODEL, load_model, save_model
from .model import RadCLIPModel, RankedPrompt, VolumeEmbedding
from .preprocessing import PreprocessConfig

__version__ = "0.1.0"
__all__ = ["AdapterConfig", "DEFAULT_MODEL", "PreprocessConfig", "RadCLIPError", "RadCLIPModel", "RankedPrompt",
           "SlicePoolingAdapter", "Volume", "VolumeEmbedding", "load_model", "mean_pool", "read_volume",
           "save_model"]

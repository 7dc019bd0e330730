"""Named models, in one table (the CLI's `--model clip|radclip` and the Slicer module's list), and
where the Hugging Face cache is. No torch here: Slicer's GUI process reads this module."""
from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_MODEL = "openai/clip-vit-large-patch14"
RADCLIP_REPO, RADCLIP_FILE = "zluvolyote/RadCLIP", "RadCLIP.pth"


@dataclass(frozen=True)
class Preset:
    name: str  # what `--model` accepts
    label: str  # what the Slicer module shows
    source: str  # what `load_model` receives


PRESETS = (
    Preset("clip", "CLIP ViT-L/14 (OpenAI)", DEFAULT_MODEL),
    Preset("radclip", "RadCLIP 2D — published weights", f"{RADCLIP_REPO}/{RADCLIP_FILE}"),
)
LOCAL_MODEL_LABEL = "Local model folder…"  # the Slicer module's choice for a folder or file of one's own


def resolve_preset(source):
    """A preset name or label -> its source; anything else unchanged."""
    for preset in PRESETS:
        if str(source) in (preset.name, preset.label):
            return preset.source
    return source


def hub_cache_dir(cache_dir=None) -> str:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it (HF_HUB_CACHE, HF_HOME,
    XDG_CACHE_HOME, ~/.cache/huggingface), without importing it."""
    if cache_dir:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")

# the paper's non-radiology prompts: ranked beside the real labels, a model that understood radiology
# gives them almost nothing (the demo, the evaluation's modality-recognition figure, the Slicer presets)
DISTRACTORS = ("A puppy", "A cat", "A life vest")

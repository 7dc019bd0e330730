"""Non-GUI helpers of the RadCLIPSlicer module (MRML logic, no Qt)."""
from .logic import MODEL_PRESETS, RadCLIPSlicerMRMLLogic, volumeFromNode

__all__ = ["MODEL_PRESETS", "RadCLIPSlicerMRMLLogic", "volumeFromNode"]

"""Non-GUI helpers of the RadCLIPSlicer module: MRML logic and the worker client (no Qt, no torch)."""
from .client import WorkerClient, default_command
from .logic import RadCLIPSlicerMRMLLogic, checkVolumeNode, ijkToRasArray

__all__ = ["RadCLIPSlicerMRMLLogic", "WorkerClient", "checkVolumeNode", "default_command", "ijkToRasArray"]

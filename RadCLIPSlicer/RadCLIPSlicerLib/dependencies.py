"""What Slicer's Python must have installed for the worker, decided without importing any of it.

A local worker (Slicer's own Python) needs torch and the requirements of `Resources/requirements.txt`;
a remote worker (any other command, e.g. over ssh) brings its own Python, so Slicer then needs
only what the client needs (numpy, which Slicer ships). Checked from package metadata: torch is
never imported into Slicer's process.
"""
from __future__ import annotations

from importlib import metadata

TORCH_REQUIREMENT = "torch>=2.6"  # transformers 5 disables itself under torch < 2.6


def requirementLines(path) -> list:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def missingRequirements(lines) -> list:
    """The requirement lines whose package is not installed or whose version does not fit."""
    from packaging.requirements import Requirement

    missing = []
    for line in lines:
        requirement = Requirement(line)
        try:
            if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
                missing.append(line)
        except metadata.PackageNotFoundError:
            missing.append(line)
    return missing


def workerIsLocal(workerCommand: str) -> bool:
    """'' is this Slicer's own Python; any other command runs the worker elsewhere (or in another
    environment) that has its own packages."""
    return not (workerCommand or "").strip()


def missingForWorker(requirementsPath, workerCommand: str = "") -> dict:
    """{"torch": [requirement] or [], "packages": [requirement lines]} that Slicer's Python lacks for
    the worker `workerCommand` would run (nothing for a remote worker)."""
    if not workerIsLocal(workerCommand):
        return {"torch": [], "packages": []}
    return {"torch": missingRequirements([TORCH_REQUIREMENT]),
            "packages": missingRequirements(requirementLines(requirementsPath))}

"""The named choices of the preprocessing contract, as plain data (no torch): slice planes, intensity
policies, CT windows and geometries. `intensity.py` and `preprocessing.py` implement them; the
command line's parsers and `--help` read them from here, so that they answer before torch loads."""

PLANES = ("axial", "coronal", "sagittal")
GEOMETRIES = ("letterbox", "crop")
# (level, width) in HU, the usual radiology presets
CT_WINDOWS = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft-tissue": (40.0, 400.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}
POLICIES = ("zscore-volume", "zscore-slice", "ct-window", "percentile", "ct-window-or-percentile", "minmax-8bit")
WINDOWED = ("ct-window", "ct-window-or-percentile")
DEFAULT_WINDOWS = ("lung", "mediastinum", "bone")
# the anatomy head's region pooling of patch tokens (anatomy.py)
ANATOMY_POOLINGS = ("mean", "attention")

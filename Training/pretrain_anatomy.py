"""fVLM anatomy-level training: a per-anatomy projection head on mask-pooled embeddings, trained
against the report sentences about each anatomy (normal template otherwise), encoders frozen.

    python Training/pretrain_anatomy.py --train-manifest studies.csv --lexicon lexicon.json \\
        --model runs/stage2/model --output runs/anatomy
    torchrun --nproc_per_node=N Training/pretrain_anatomy.py ...
    Slicer --no-main-window --python-script Training/pretrain_anatomy.py ...
Manifest columns: image (volume), mask (label map aligned with it), text (the report), split.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: RadCLIPCore and Training

from Training._entry import run  # noqa: E402
from RadCLIPCore.commands.train import main_anatomy  # noqa: E402

if __name__ == "__main__":
    run(main_anatomy)

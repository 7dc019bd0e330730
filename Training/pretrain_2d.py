"""RadCLIP stage 1: fine-tune CLIP's image encoder on 2D image-text pairs (text encoder frozen).

    python Training/pretrain_2d.py --train-manifest train.csv --output runs/stage1 [--help]
    torchrun --nproc_per_node=N Training/pretrain_2d.py ...
    Slicer --no-main-window --python-script Training/pretrain_2d.py ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: RadCLIPCore and Training

from Training._entry import run  # noqa: E402
from RadCLIPCore.commands.train import main_stage1  # noqa: E402

if __name__ == "__main__":
    run(main_stage1)

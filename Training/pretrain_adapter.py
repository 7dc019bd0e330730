"""RadCLIP stage 2: train the slice-pooling adapter on 3D volume-text pairs (both encoders frozen).

    python Training/pretrain_adapter.py --train-manifest volumes.csv --model runs/stage1/model --output runs/stage2
    torchrun --nproc_per_node=N Training/pretrain_adapter.py ...
    Slicer --no-main-window --python-script Training/pretrain_adapter.py ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: RadCLIPCore and Training

from Training._entry import run  # noqa: E402
from RadCLIPCore.commands.train import main_stage2  # noqa: E402

if __name__ == "__main__":
    run(main_stage2)

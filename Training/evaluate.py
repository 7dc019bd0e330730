"""RadCLIP evaluation: linear probe (5-fold, 70/10/20), top-1 image-text matching, zero-shot AUC,
retrieval, and the encoder x pooling ablation, as a markdown table, CSV, JSON and plots.

    python Training/evaluate.py --manifest volumes.csv --model clip=openai/clip-vit-large-patch14 \\
        --model radclip=runs/stage2/model --output runs/eval
    Slicer --no-main-window --python-script Training/evaluate.py ...
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: RadCLIPCore and Training

from Training._entry import run  # noqa: E402
from RadCLIPCore.commands.evaluate import main  # noqa: E402

if __name__ == "__main__":
    run(main)

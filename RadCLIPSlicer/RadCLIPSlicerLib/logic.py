"""The module's MRML work, free of Qt, widgets and torch: volume node -> worker request, and the
worker's result -> table, relevance volume and chart nodes. Runs on Slicer's GUI thread, so it
only reads and writes MRML; every model computation happens in the worker process.

    logic = RadCLIPSlicerMRMLLogic()
    client = WorkerClient()
    result = client.wait(client.send_rank(prompts, **logic.volumeRequest(volumeNode)))["result"]
    nodes = logic.showResults(volumeNode, result)
"""
from __future__ import annotations

import hashlib

import numpy as np
import slicer
import vtk

from RadCLIPCore.errors import RadCLIPError
from RadCLIPCore.volume_io import ijk_axis

from .overlay import FOREGROUND_OPACITY, applyRelevanceDisplay

TABLE_COLUMNS = ("prompt", "probability", "cosine")
SEGMENT_TABLE_COLUMNS = ("segment", "prompt", "probability", "cosine")


def ijkToRasArray(volumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def checkVolumeNode(volumeNode):
    """A scalar volume node with voxels, or a one-line RadCLIPError saying what is wrong."""
    if volumeNode is None:
        raise RadCLIPError("select an input volume")
    if volumeNode.GetImageData() is None:
        raise RadCLIPError(f"volume '{volumeNode.GetName()}' has no image data (load or compute its voxels first)")
    if volumeNode.GetImageData().GetNumberOfScalarComponents() != 1:
        raise RadCLIPError(f"'{volumeNode.GetName()}' is not a scalar volume (colour or vector voxels)")
    return volumeNode


def _nodesByClass(scene, className) -> list:
    nodes = scene.GetNodesByClass(className)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


class RadCLIPSlicerMRMLLogic:
    """Volume nodes in, result nodes out; the worker does the rest."""

    # ------------------------------------------------------------------ requests (GUI thread: MRML reads only)
    @staticmethod
    def volumeKey(volumeNode) -> str:
        """Changes whenever the voxels or the geometry change, so the worker can keep what it holds."""
        image = checkVolumeNode(volumeNode).GetImageData()
        geometry = hashlib.blake2b(ijkToRasArray(volumeNode).tobytes(), digest_size=8).hexdigest()
        return f"{volumeNode.GetID()}:{image.GetMTime()}:{geometry}"

    def volumeRequest(self, volumeNode, segmentationNode=None) -> dict:
        """What a rank request needs of the scene: the voxels (a view, no copy), the IJK-to-RAS
        matrix, a key for them and, with a segmentation, its label map and segment names."""
        fields = {"array": slicer.util.arrayFromVolume(checkVolumeNode(volumeNode)),
                  "ijk_to_ras": ijkToRasArray(volumeNode), "volume_key": self.volumeKey(volumeNode)}
        if segmentationNode is not None:
            labels, names = self.labelMapFromSegmentation(segmentationNode, volumeNode)
            fields.update(labelmap=labels, segments=names)
        return fields

    @staticmethod
    def labelMapFromSegmentation(segmentationNode, referenceVolumeNode):
        """The segments as one label array on the reference volume's grid, and {label: name}."""
        scene = referenceVolumeNode.GetScene()
        segmentIds = vtk.vtkStringArray()
        segmentationNode.GetSegmentation().GetSegmentIDs(segmentIds)
        if segmentIds.GetNumberOfValues() == 0:
            raise RadCLIPError(f"'{segmentationNode.GetName()}' has no segments")
        colorTablesBefore = {n.GetID() for n in _nodesByClass(scene, "vtkMRMLColorTableNode")}
        labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
                raise RadCLIPError(f"could not export '{segmentationNode.GetName()}' to a label map")
            # the exporter numbers the segments 1, 2, ... in the order of their IDs
            names = {i + 1: segmentationNode.GetSegmentation().GetSegment(segmentIds.GetValue(i)).GetName()
                     for i in range(segmentIds.GetNumberOfValues())}
            labels = slicer.util.arrayFromVolume(labelmapNode).copy()
            if labels.shape != slicer.util.arrayFromVolume(referenceVolumeNode).shape:
                raise RadCLIPError(f"'{segmentationNode.GetName()}' could not be put on the grid of "
                                   f"'{referenceVolumeNode.GetName()}'")
        finally:
            scene.RemoveNode(labelmapNode)
            # the exporter also adds a visible '<segmentation>_ColorTable' node: leave no strays
            for node in _nodesByClass(scene, "vtkMRMLColorTableNode"):
                if node.GetID() not in colorTablesBefore:
                    scene.RemoveNode(node)
        return labels, names

    # ------------------------------------------------------------------ results (GUI thread: MRML writes)
    def showResults(self, volumeNode, result: dict, tableNode=None, relevanceNode=None, chartNode=None,
                    prompt: str | None = None) -> dict:
        """Fill (or create) the table, the relevance volume and the chart from a worker `result`.
        The viewers show `prompt`'s relevance (default: the best prompt). Returns the nodes and
        what the overlay shows."""
        scene = volumeNode.GetScene()
        tableNode = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode", f"{volumeNode.GetName()} prompts")
        self.fillTable(tableNode, [(None, result["prompts"])])
        relevanceNode = relevanceNode or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                                  f"{volumeNode.GetName()} slice relevance")
        chartNode = chartNode or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{volumeNode.GetName()} slices")
        shown = self.showPrompt(volumeNode, result, prompt or result["prompts"][0]["text"], relevanceNode, chartNode)
        return {"table": tableNode, "relevance": relevanceNode, "chart": chartNode, **shown}

    def showPrompt(self, volumeNode, result: dict, prompt: str, relevanceNode, chartNode) -> dict:
        """Show `prompt`'s per-slice relevance over the viewers and in the chart (beside the
        adapter's attention when the model has one)."""
        entry = next((p for p in result["prompts"] if p["text"] == prompt), None)
        if entry is None:
            raise RadCLIPError(f"'{prompt}' is not among the ranked prompts")
        relevance = np.asarray(entry["relevance"], dtype=np.float32)
        visible = self.updateRelevanceVolume(relevanceNode, volumeNode, relevance, result["slice_axis"])
        relevanceNode.SetAttribute("RadCLIP.prompt", prompt)
        relevanceNode.SetAttribute("RadCLIP.plane", result["plane"])
        curves = {}
        if result.get("pooling") == "adapter":
            curves["adapter attention"] = np.asarray(result["slice_weights"], dtype=float)
        curves[f"relevance: {prompt}"] = relevance.astype(float)
        self.updatePlot(chartNode, volumeNode, curves, result["slice_axis"], result["plane"])
        return {"prompt": prompt, "peak_slice": int(np.argmax(relevance)), "overlay_visible": visible}

    @staticmethod
    def fillTable(tableNode, groups):
        """`groups` = [(segment name or None, prompts best first)]: columns prompt, probability,
        cosine, with a segment column in front when the groups are segments."""
        segments = any(name is not None for name, _ in groups)
        names = SEGMENT_TABLE_COLUMNS if segments else TABLE_COLUMNS
        columns = [vtk.vtkStringArray() for _ in names[:-2]] + [vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
        for column, name in zip(columns, names):
            column.SetName(name)
        for segmentName, rows in groups:
            for r in rows:
                for column, value in zip(columns, ([segmentName] if segments else []) + [r["text"]]):
                    column.InsertNextValue(value)
                columns[-2].InsertNextValue(r["probability"])
                columns[-1].InsertNextValue(r["cosine"])
        table = vtk.vtkTable()
        for column in columns:
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        tableNode.SetUseColumnTitleAsColumnHeader(True)  # table row r is view row r (no header row)
        tableNode.SetLocked(True)
        return tableNode

    def showSegmentResults(self, volumeNode, result: dict, tableNode=None) -> dict:
        """The per-segment table (segment, prompt, probability, cosine) from a worker `result`."""
        if not result.get("segments"):
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(result.get("missing_segments", {}).items()))
            raise RadCLIPError(f"no segment can be ranked ({why})")
        tableNode = tableNode or volumeNode.GetScene().AddNewNodeByClass(
            "vtkMRMLTableNode", f"{volumeNode.GetName()} prompts per segment")
        self.fillTable(tableNode, [(s["segment"], s["prompts"]) for s in result["segments"]])
        return {"table": tableNode, "missing": dict(result.get("missing_segments", {}))}

    # ------------------------------------------------------------------ geometry
    @staticmethod
    def relevanceGeometry(volumeNode, sliceAxis: int) -> tuple:
        """(shape (k, j, i), IJK-to-RAS 4x4) of the compact relevance volume: the pooled axis keeps
        every slice at the input's positions; each in-plane axis is one voxel spanning the input's
        whole extent. Its slice s coincides in RAS with the input's slice s."""
        matrix = ijkToRasArray(volumeNode)
        dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k)
        pooled = ijk_axis(sliceAxis)
        out = matrix.copy()
        centre = np.zeros(3)
        size = [1, 1, 1]
        for axis in range(3):
            if axis == pooled:
                size[axis] = dims[axis]
            else:
                out[:3, axis] = matrix[:3, axis] * dims[axis]
                centre[axis] = (dims[axis] - 1) / 2
        out[:3, 3] = matrix[:3, :3] @ centre + matrix[:3, 3]
        return (size[2], size[1], size[0]), out

    def updateRelevanceVolume(self, relevanceNode, volumeNode, weights, sliceAxis: int) -> bool:
        """Per-slice `weights` (sum 1) as a compact volume over the input. Slices above the uniform
        level are coloured, the rest are transparent; a flat curve is not shown at all (a veil over
        every slice would say nothing). Returns whether the overlay shows anything."""
        shape, matrix = self.relevanceGeometry(volumeNode, sliceAxis)
        weights = np.asarray(weights, dtype=np.float32)
        slicer.util.updateVolumeFromArray(relevanceNode, weights.reshape(shape))  # one axis has length n
        vtkMatrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                vtkMatrix.SetElement(r, c, matrix[r, c])
        relevanceNode.SetIJKToRASMatrix(vtkMatrix)
        visible = applyRelevanceDisplay(relevanceNode, weights)
        relevanceNode.SetAttribute("RadCLIP.sourceVolumeID", volumeNode.GetID())
        relevanceNode.SetAttribute("RadCLIP.sliceAxis", str(sliceAxis))
        return visible

    @staticmethod
    def showInViewers(volumeNode, relevanceNode):
        """Every slice viewer: the ranked volume as background, its relevance as foreground (the
        overlay's own colour table carries the opacity; see overlay.py)."""
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=relevanceNode,
                                         foregroundOpacity=FOREGROUND_OPACITY)

    @staticmethod
    def slicePositionsMm(volumeNode, sliceAxis: int, count: int) -> np.ndarray:
        """Signed distance (mm) of each input slice along the pooled axis from slice 0."""
        step = np.linalg.norm(ijkToRasArray(volumeNode)[:3, ijk_axis(sliceAxis)])
        return np.arange(count) * step

    def updatePlot(self, chartNode, volumeNode, curves: dict, sliceAxis: int, plane: str):
        """One series per curve ({name: per-slice values}) over the slice number, updated in place."""
        n = len(next(iter(curves.values())))
        tableNode = self._referenced(chartNode, "RadCLIP.table", "vtkMRMLTableNode", f"{chartNode.GetName()} data")
        table = vtk.vtkTable()
        columns = {"slice": np.arange(n, dtype=float),
                   "position (mm)": self.slicePositionsMm(volumeNode, sliceAxis, n), **curves}
        for name, values in columns.items():
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            for v in values:
                column.InsertNextValue(float(v))
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        chartNode.RemoveAllPlotSeriesNodeIDs()
        colors = {"adapter attention": (0.85, 0.2, 0.1)}
        for index, name in enumerate(curves):
            role = f"RadCLIP.series{index}"
            series = self._referenced(chartNode, role, "vtkMRMLPlotSeriesNode", name)
            series.SetName(name)
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("slice")
            series.SetYColumnName(name)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            series.SetColor(*colors.get(name, (0.1, 0.35, 0.85)))
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        chartNode.SetTitle(f"{volumeNode.GetName()}: where along the volume ({plane} slices)")
        chartNode.SetXAxisTitle(f"{plane} slice")
        chartNode.SetYAxisTitle("weight (sums to 1)")
        chartNode.SetLegendVisibility(len(curves) > 1)
        return chartNode

    @staticmethod
    def _referenced(owner, role, className, name):
        """A helper node `owner` references under `role`, created once and reused on every update."""
        node = owner.GetNodeReference(role)
        if node is None:
            node = owner.GetScene().AddNewNodeByClass(className, name)
            owner.SetNodeReferenceID(role, node.GetID())
        return node

    @staticmethod
    def sliceCentreRas(volumeNode, sliceAxis: int, sliceIndex: int) -> np.ndarray:
        """RAS centre of input slice `sliceIndex` along the pooled axis (to move the viewers there)."""
        matrix = ijkToRasArray(volumeNode)
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = np.array([(d - 1) / 2 for d in dims] + [1.0])
        ijk[ijk_axis(sliceAxis)] = sliceIndex
        return (matrix @ ijk)[:3]

    def peakSliceRas(self, volumeNode, relevanceNode) -> np.ndarray:
        """RAS centre of the input slice where the shown curve peaks, read from the relevance volume
        itself (no model, no worker: works after a scene reload too)."""
        if relevanceNode is None or relevanceNode.GetImageData() is None:
            raise RadCLIPError("rank the prompts first")
        sliceAxis = int(relevanceNode.GetAttribute("RadCLIP.sliceAxis") or 0)
        weights = slicer.util.arrayFromVolume(relevanceNode).ravel()
        return self.sliceCentreRas(volumeNode, sliceAxis, int(np.argmax(weights)))

"""The module's MRML work, free of Qt and widgets: volume node -> RadCLIPCore -> table, attention
volume and plot nodes. Usable from the Python console, scripts, and tests with slicer-core.

    logic = RadCLIPSlicerMRMLLogic()
    model = logic.loadModel("/models/RadCLIP.pth")
    table = logic.rank(volumeNode, ["Chest CT", "Brain MRI"], model)["table"]
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import slicer
import vtk

from RadCLIPCore import RadCLIPError, Volume, load_model
from RadCLIPCore.anatomy import LabelMap, anatomy_embeddings

TABLE_COLUMNS = ("prompt", "probability", "cosine")
SEGMENT_TABLE_COLUMNS = ("segment", "prompt", "probability", "cosine")
HEAT_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
EMBEDDING_CACHE_SIZE = 8

# model presets offered in the panel: label -> (load_model source, needs a local path)
MODEL_PRESETS = OrderedDict([
    ("CLIP ViT-L/14 (OpenAI)", ("openai/clip-vit-large-patch14", False)),
    ("RadCLIP 2D — published weights", ("radclip", False)),
    ("Local model folder…", (None, True)),
])


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


def volumeFromNode(volumeNode) -> Volume:
    """The node's voxels (a view, no copy) with their geometry, in RadCLIPCore's terms."""
    checkVolumeNode(volumeNode)
    return Volume.from_ijk_to_ras(slicer.util.arrayFromVolume(volumeNode), ijkToRasArray(volumeNode))


def _nodesByClass(scene, className) -> list:
    nodes = scene.GetNodesByClass(className)
    return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]


class RadCLIPSlicerMRMLLogic:
    """Rank prompts for volume nodes; keep embeddings so new prompts cost only the text tower."""

    def __init__(self):
        self._models = {}
        self._embeddings = OrderedDict()

    # ------------------------------------------------------------------ models
    def loadModel(self, source, device="auto", offline=False, precision="auto"):
        key = (str(source), device, bool(offline), precision)
        if key not in self._models:
            self._models[key] = load_model(source, device=device, precision=precision, offline=offline or None)
        return self._models[key]

    # ------------------------------------------------------------------ embedding
    def embeddingKey(self, volumeNode, model, plane, maxSlices):
        """Node + its voxel and geometry modification times + model + settings."""
        image = checkVolumeNode(volumeNode).GetImageData()
        return (volumeNode.GetID(), image.GetMTime(), tuple(ijkToRasArray(volumeNode).ravel()), id(model),
                plane, maxSlices)

    def cachedEmbedding(self, volumeNode, model, plane="auto", maxSlices=None):
        return self._embeddings.get(self.embeddingKey(volumeNode, model, plane, maxSlices))

    def embed(self, volumeNode, model, plane="auto", maxSlices=None, progress=False):
        key = self.embeddingKey(volumeNode, model, plane, maxSlices)
        if key not in self._embeddings:
            self._embeddings[key] = model.embed_volume(volumeFromNode(volumeNode), plane=plane,
                                                       max_slices=maxSlices, progress=progress)
            while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
                self._embeddings.popitem(last=False)
        self._embeddings.move_to_end(key)
        return self._embeddings[key]

    # ------------------------------------------------------------------ ranking
    def rank(self, volumeNode, prompts, model, plane="auto", maxSlices=None, tableNode=None, attentionNode=None,
             chartNode=None):
        """Rank `prompts` for `volumeNode`; fill (or create) the output nodes and return them as a dict
        {"table", "attention", "chart", "embedding"}."""
        emb = self.embed(volumeNode, model, plane, maxSlices)
        return self.showResults(volumeNode, emb, model.rank(emb, prompts), tableNode, attentionNode, chartNode)

    def showResults(self, volumeNode, emb, ranked, tableNode=None, attentionNode=None, chartNode=None):
        scene = volumeNode.GetScene()
        tableNode = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode", f"{volumeNode.GetName()} prompts")
        self.fillTable(tableNode, ranked)
        attentionNode = attentionNode or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                                                  f"{volumeNode.GetName()} slice attention")
        self.updateAttentionVolume(attentionNode, volumeNode, emb)
        chartNode = chartNode or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{volumeNode.GetName()} attention")
        self.updatePlot(chartNode, volumeNode, emb)
        return {"table": tableNode, "attention": attentionNode, "chart": chartNode, "embedding": emb}

    @staticmethod
    def fillTable(tableNode, ranked, segment=None):
        """Prompt, probability, cosine (best first); with `segment`, a list of (segment name, ranked)
        fills segment, prompt, probability, cosine — each segment's prompts best first."""
        groups = [(None, ranked)] if segment is None else segment
        names = SEGMENT_TABLE_COLUMNS if segment is not None else TABLE_COLUMNS
        columns = [vtk.vtkStringArray() for _ in names[:-2]] + [vtk.vtkDoubleArray(), vtk.vtkDoubleArray()]
        for column, name in zip(columns, names):
            column.SetName(name)
        for segmentName, rows in groups:
            for r in rows:
                values = ([segmentName] if segment is not None else []) + [r.prompt]
                for column, value in zip(columns, values):
                    column.InsertNextValue(value)
                columns[-2].InsertNextValue(r.probability)
                columns[-1].InsertNextValue(r.cosine)
        table = vtk.vtkTable()
        for column in columns:
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        tableNode.SetLocked(True)
        return tableNode

    # ------------------------------------------------------------------ per segment (fVLM)
    @staticmethod
    def labelMapFromSegmentation(segmentationNode, referenceVolumeNode) -> LabelMap:
        """The segments as one label map on the reference volume's grid, with their names."""
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
            volume = Volume.from_ijk_to_ras(slicer.util.arrayFromVolume(labelmapNode).copy(),
                                            ijkToRasArray(labelmapNode))
        finally:
            scene.RemoveNode(labelmapNode)
            # the exporter also adds a visible '<segmentation>_ColorTable' node: leave no strays
            for node in _nodesByClass(scene, "vtkMRMLColorTableNode"):
                if node.GetID() not in colorTablesBefore:
                    scene.RemoveNode(node)
        return LabelMap(volume, names)

    def rankSegments(self, volumeNode, segmentationNode, prompts, model, plane="auto", maxSlices=None,
                     tableNode=None, minPatches=1.0):
        """Rank `prompts` for each segment's anatomy embedding, into one table (segment, prompt,
        probability, cosine). Returns {"table", "missing": {segment name: reason}}."""
        checkVolumeNode(volumeNode)
        labels = self.labelMapFromSegmentation(segmentationNode, volumeNode)
        # every segment is asked for by its label, so an empty one is reported, never silently dropped
        result = anatomy_embeddings(model, volumeFromNode(volumeNode), labels, labels=sorted(labels.names),
                                    plane=plane, max_slices=maxSlices, min_patches=minPatches)
        if not result.embeddings:
            why = "; ".join(f"{result.names[v]}: {reason}" for v, reason in sorted(result.missing.items()))
            raise RadCLIPError(f"no segment of '{segmentationNode.GetName()}' can be ranked ({why})")
        return self.showSegmentResults(volumeNode, result, model, prompts, tableNode)

    def showSegmentResults(self, volumeNode, anatomy, model, prompts, tableNode=None):
        """Fill the per-segment table from `anatomy` (RadCLIPCore.anatomy.AnatomyEmbeddings)."""
        groups = [(anatomy.names[v], model.rank(vec, prompts)) for v, vec in sorted(anatomy.embeddings.items())]
        tableNode = tableNode or volumeNode.GetScene().AddNewNodeByClass(
            "vtkMRMLTableNode", f"{volumeNode.GetName()} prompts per segment")
        self.fillTable(tableNode, None, segment=groups)
        return {"table": tableNode, "missing": {anatomy.names[v]: why for v, why in anatomy.missing.items()},
                "anatomy": anatomy}

    @staticmethod
    def attentionGeometry(volumeNode, emb) -> tuple:
        """(shape (k, j, i), IJK-to-RAS 4x4) of the compact attention volume: the pooled axis keeps
        every slice at the input's positions; each in-plane axis is one voxel spanning the input's
        whole extent. Its slice s coincides in RAS with the input's slice s."""
        matrix = ijkToRasArray(volumeNode)
        dims = volumeNode.GetImageData().GetDimensions()  # (i, j, k)
        pooled = 2 - emb.slice_axis  # numpy axis -> IJK axis
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

    def updateAttentionVolume(self, attentionNode, volumeNode, emb):
        shape, matrix = self.attentionGeometry(volumeNode, emb)
        weights = np.asarray(emb.slice_weights, dtype=np.float32)
        array = weights.reshape(shape)  # exactly one axis has length n
        slicer.util.updateVolumeFromArray(attentionNode, array)
        vtkMatrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                vtkMatrix.SetElement(r, c, matrix[r, c])
        attentionNode.SetIJKToRASMatrix(vtkMatrix)
        if attentionNode.GetDisplayNode() is None:
            attentionNode.CreateDefaultDisplayNodes()
        display = attentionNode.GetDisplayNode()
        if volumeNode.GetScene().GetNodeByID(HEAT_COLOR_NODE_ID) is not None:
            display.SetAndObserveColorNodeID(HEAT_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, float(weights.max()))
        display.SetInterpolate(False)
        attentionNode.SetAttribute("RadCLIP.sourceVolumeID", volumeNode.GetID())
        attentionNode.SetAttribute("RadCLIP.plane", emb.plane)
        return attentionNode

    @staticmethod
    def slicePositionsMm(volumeNode, emb) -> np.ndarray:
        """Signed distance (mm) of each input slice along the pooled axis from slice 0."""
        matrix = ijkToRasArray(volumeNode)
        step = np.linalg.norm(matrix[:3, 2 - emb.slice_axis])
        return np.arange(len(emb.slice_weights)) * step

    def updatePlot(self, chartNode, volumeNode, emb):
        tableNode = self._referenced(chartNode, "RadCLIP.table", "vtkMRMLTableNode", f"{chartNode.GetName()} data")
        table = vtk.vtkTable()
        for name, values in (("slice", np.arange(len(emb.slice_weights), dtype=float)),
                             ("position (mm)", self.slicePositionsMm(volumeNode, emb)),
                             ("weight", emb.slice_weights.astype(float))):
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            for v in values:
                column.InsertNextValue(float(v))
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        series = self._referenced(chartNode, "RadCLIP.series", "vtkMRMLPlotSeriesNode", "slice weight")
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName("slice")
        series.SetYColumnName("weight")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(0.85, 0.2, 0.1)
        chartNode.RemoveAllPlotSeriesNodeIDs()
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        chartNode.SetTitle(f"{volumeNode.GetName()}: {emb.plane} slice attention ({emb.pooling})")
        chartNode.SetXAxisTitle(f"{emb.plane} slice")
        chartNode.SetYAxisTitle("weight")
        chartNode.SetLegendVisibility(False)
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
    def sliceCentreRas(volumeNode, emb, sliceIndex) -> np.ndarray:
        """RAS centre of input slice `sliceIndex` along the pooled axis (to move the viewers there)."""
        matrix = ijkToRasArray(volumeNode)
        dims = volumeNode.GetImageData().GetDimensions()
        ijk = np.array([(d - 1) / 2 for d in dims] + [1.0])
        ijk[2 - emb.slice_axis] = sliceIndex
        return (matrix @ ijk)[:3]

    def mostAttendedSliceRas(self, volumeNode, emb) -> np.ndarray:
        return self.sliceCentreRas(volumeNode, emb, emb.most_attended_slice)

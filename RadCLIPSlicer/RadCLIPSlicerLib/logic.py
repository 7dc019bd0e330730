"""The module's MRML work, free of Qt, widgets and torch: volume node -> worker request, and the
worker's result -> table, relevance volume, chart and viewer layers. Runs on Slicer's GUI thread,
so it only reads and writes MRML; every model computation happens in the worker process.

A result belongs to the request that made it: `startRanking` records the volume and segmentation
nodes in a `RankingRun`, and everything shown later (the result, another prompt's relevance, a
jump to a slice) uses those nodes, never the ones selected at the time.

    logic = RadCLIPSlicerMRMLLogic()
    client = WorkerClient()
    run = logic.startRanking(client, volumeNode, ["Chest CT", "Brain MRI"], model="/path/to/model")
    shown = logic.finishRanking(run, client.wait(run.requestId)["result"], outputs)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

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


def findingRows(result) -> list:
    """The findings of a worker `findings` result as table rows: the whole volume's first, then each
    anatomy's; each row is the finding's record with its "anatomy" ("(volume)" for the whole)."""
    rows = [{**f, "anatomy": WHOLE_VOLUME} for f in result["findings"]]
    for group in result.get("anatomies") or []:
        rows += [{**f, "anatomy": group["anatomy"]} for f in group["findings"]]
    return rows


def _nodesByClass(scene, className) -> list:
    """The scene's nodes of a class, without the vtkCollection that GetNodesByClass returns (the
    caller owns it; from Python it would leak, holding a reference to every node in it)."""
    return [scene.GetNthNodeByClass(i, className) for i in range(scene.GetNumberOfNodesByClass(className))]


@dataclass
class RankingRun:
    """One rank request and the nodes it was made for: its result is shown on these, whatever the
    panel selects in the meantime."""

    requestId: int
    volumeNodeID: str
    volumeName: str
    segmentationNodeID: str | None = None
    prompts: list = field(default_factory=list)  # the prompts ranked, or the findings scored
    kind: str = "rank"  # or "findings"

    def volumeNode(self, scene):
        node = scene.GetNodeByID(self.volumeNodeID)
        if node is None:
            raise RadCLIPError(f"'{self.volumeName}' was removed from the scene before its result arrived")
        return node


OUTPUT_ROLES = ("outputTable", "segmentTable", "relevanceVolume", "relevanceChart", "findingsTable")
FINDINGS_TABLE_COLUMNS = ("anatomy", "finding", "probability", "call", "threshold", "sensitivity", "specificity")
WHOLE_VOLUME = "(volume)"


class RadCLIPSlicerMRMLLogic:
    """Volume nodes in, result nodes out; the worker does the rest. The one place that decides what
    a result looks like in the scene."""

    def __init__(self):
        self._results: dict = {}  # relevance node ID -> (run, result) on display

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

    def startRanking(self, client, volumeNode, prompts, segmentationNode=None, **options) -> RankingRun:
        """Read the scene and send one rank request to the worker `client`; the run remembers the
        nodes it was made for."""
        prompts = self._texts(volumeNode, prompts, "prompt")
        fields = self.volumeRequest(volumeNode, segmentationNode)
        rid = client.send_rank(prompts, **options, **fields)
        return RankingRun(rid, volumeNode.GetID(), volumeNode.GetName(),
                          segmentationNode.GetID() if segmentationNode is not None else None, prompts)

    @staticmethod
    def _texts(volumeNode, texts, what) -> list:
        """The non-empty lines of a request, and a volume that is a scan (not our own output)."""
        texts = [t.strip() for t in texts if t and t.strip()]
        if not texts:
            raise RadCLIPError(f"type at least one {what} (one per line)")
        if volumeNode is not None and volumeNode.GetAttribute("RadCLIP.sourceVolumeID"):
            raise RadCLIPError(f"'{volumeNode.GetName()}' is RadCLIP's own relevance volume; choose the scan as input")
        return texts

    def startFindings(self, client, volumeNode, findings, segmentationNode=None, **options) -> RankingRun:
        """Send one `findings` request for the volume (and the anatomies of its segmentation, whose
        segment names the worker groups with the bundled TotalSegmentator lexicon)."""
        findings = self._texts(volumeNode, findings, "finding")
        fields = self.volumeRequest(volumeNode, segmentationNode)
        rid = client.send_findings(findings, **options, **fields)
        return RankingRun(rid, volumeNode.GetID(), volumeNode.GetName(),
                          segmentationNode.GetID() if segmentationNode is not None else None, findings, "findings")

    def finishFindings(self, run: RankingRun, result: dict, outputs) -> dict:
        """Show a worker `findings` result on the nodes of its run: the findings table (one row per
        anatomy and finding; `outputs.findingsTable`), and the first row's per-slice evidence over
        the viewers and in the chart. Returns what is shown."""
        volumeNode = run.volumeNode(self._scene(outputs, run))
        scene, name = volumeNode.GetScene(), volumeNode.GetName()
        table = outputs.findingsTable or scene.AddNewNodeByClass("vtkMRMLTableNode")
        table.SetName(f"{name} findings")
        self.fillFindingsTable(table, result)
        outputs.findingsTable = table
        relevance = outputs.relevanceVolume or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        chart = outputs.relevanceChart or scene.AddNewNodeByClass("vtkMRMLPlotChartNode")
        relevance.SetName(f"{name} finding evidence")
        chart.SetName(f"{name} slices")
        outputs.relevanceVolume, outputs.relevanceChart = relevance, chart
        self._results[relevance.GetID()] = (run, result)
        first = findingRows(result)[0]
        shown = self.showFinding(volumeNode, result, first["anatomy"], first["finding"], relevance, chart)
        shown.update(warnings=list(result.get("warnings") or []), missing=dict(result.get("missing_anatomies") or {}),
                     unknown=list(result.get("unknown_segments") or []), rows=len(findingRows(result)),
                     thresholds=result.get("operating_points"))
        return shown

    def showFinding(self, volumeNode, result: dict, anatomy: str, finding: str, relevanceNode, chartNode) -> dict:
        """One finding's per-slice evidence (on `anatomy`, or the whole volume) over the viewers and in
        the chart."""
        row = next((r for r in findingRows(result) if r["anatomy"] == anatomy and r["finding"] == finding), None)
        if row is None:
            raise RadCLIPError(f"'{finding}' ({anatomy}) is not among the scored findings")
        evidence = np.asarray(row["evidence"], dtype=np.float32)
        visible = self.updateRelevanceVolume(relevanceNode, volumeNode, evidence, result["slice_axis"])
        label = finding if anatomy == WHOLE_VOLUME else f"{finding} ({anatomy})"
        relevanceNode.SetAttribute("RadCLIP.prompt", label)
        relevanceNode.SetAttribute("RadCLIP.plane", result["plane"])
        self.updatePlot(chartNode, volumeNode, {f"evidence: {label}": evidence.astype(float)}, result["slice_axis"],
                        result["plane"])
        return {"prompt": label, "finding": row, "peak_slice": int(np.argmax(evidence)), "overlay_visible": visible}

    def showFindingOf(self, outputs, row: int) -> dict:
        """Show row `row` of the findings table on display, on the volume its result belongs to."""
        relevanceNode = outputs.relevanceVolume
        if relevanceNode is None or relevanceNode.GetID() not in self._results:
            raise RadCLIPError("score the findings first (results are kept until the module is reloaded)")
        run, result = self._results[relevanceNode.GetID()]
        rows = findingRows(result) if run.kind == "findings" else []
        if not 0 <= row < len(rows):
            raise RadCLIPError("select a row of the findings table")
        return self.showFinding(run.volumeNode(relevanceNode.GetScene()), result, rows[row]["anatomy"],
                                rows[row]["finding"], relevanceNode, outputs.relevanceChart)

    @staticmethod
    def fillFindingsTable(tableNode, result):
        """Columns anatomy, finding, probability, call (present/absent at the operating point, or
        blank), threshold, sensitivity, specificity; row r is `findingRows(result)[r]`."""
        columns = [vtk.vtkStringArray() for _ in FINDINGS_TABLE_COLUMNS]
        columns[2] = vtk.vtkDoubleArray()
        for column, name in zip(columns, FINDINGS_TABLE_COLUMNS):
            column.SetName(name)
        for r in findingRows(result):
            op = r["operating_point"]
            call = "" if r["present"] is None else ("present" if r["present"] else "absent")
            values = [r["anatomy"], r["finding"], r["probability"], call] + (
                [f"{op['threshold']:.4f}", f"{op['sensitivity']:.2f}", f"{op['specificity']:.2f}"] if op else ["", "", ""])
            for column, value in zip(columns, values):
                column.InsertNextValue(value)
        table = vtk.vtkTable()
        for column in columns:
            table.AddColumn(column)
        tableNode.SetAndObserveTable(table)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.SetLocked(True)
        return tableNode

    def finishRanking(self, run: RankingRun, result: dict, outputs, provisional: bool = False) -> dict:
        """Show a worker `result` on the nodes of its `run`: `outputs` has the attributes
        outputTable, segmentTable, relevanceVolume, relevanceChart (None: created here; the panel
        passes its parameter node) and they are set to the nodes filled. The volume-level result is
        always shown; segments that could not be ranked are named in `missing`, and when none could,
        `segmentError` says why (the segment table is then emptied, never left from an earlier run).
        `provisional`: the worker's early answer from a subset of the slices: shown the same way,
        marked provisional (node names and the `RadCLIP.provisional` attribute) with the segment
        table emptied; the final result replaces it. Returns what is shown."""
        volumeNode = run.volumeNode(self._scene(outputs, run))
        shown = self.showResults(volumeNode, result, outputs.outputTable, outputs.relevanceVolume,
                                 outputs.relevanceChart)
        outputs.outputTable, outputs.relevanceVolume, outputs.relevanceChart = (
            shown["table"], shown["relevance"], shown["chart"])
        for node in (shown["table"], shown["relevance"], shown["chart"]):
            node.SetAttribute("RadCLIP.provisional", "true" if provisional else "false")
            if provisional:
                node.SetName(f"{node.GetName()} (provisional)")
        self._results[shown["relevance"].GetID()] = (run, result)
        shown.update(missing={}, segmentError=None, best=result["prompts"][0], provisional=provisional)
        if provisional:
            if outputs.segmentTable is not None:  # the final result fills it
                self.fillTable(outputs.segmentTable, [])
        elif run.segmentationNodeID is None:
            if outputs.segmentTable is not None:  # an earlier run's segments would describe another volume
                self.fillTable(outputs.segmentTable, [])
        else:
            segmentTable = outputs.segmentTable or volumeNode.GetScene().AddNewNodeByClass("vtkMRMLTableNode")
            segmentTable.SetName(f"{volumeNode.GetName()} prompts per segment")
            groups = [(s["segment"], s["prompts"]) for s in result.get("segments") or []]
            self.fillTable(segmentTable, groups, segments=True)
            outputs.segmentTable = segmentTable
            shown["missing"] = dict(result.get("missing_segments") or {})
            if not groups:
                why = "; ".join(f"{name}: {reason}" for name, reason in sorted(shown["missing"].items()))
                shown["segmentError"] = f"no segment can be ranked ({why or 'the segmentation is empty'})"
        return shown

    def showPromptOf(self, outputs, prompt: str) -> dict:
        """Show another prompt of the result on display: on the volume that result belongs to."""
        relevanceNode = outputs.relevanceVolume
        if relevanceNode is None or relevanceNode.GetID() not in self._results:
            raise RadCLIPError("rank the prompts first (results are kept until the module is reloaded)")
        run, result = self._results[relevanceNode.GetID()]
        if run.kind != "rank":
            raise RadCLIPError("the results on display are findings: select a row of the findings table")
        volumeNode = run.volumeNode(relevanceNode.GetScene())
        return self.showPrompt(volumeNode, result, prompt, relevanceNode, outputs.relevanceChart)

    def jumpTarget(self, relevanceNode, sliceIndex=None) -> np.ndarray:
        """RAS centre of input slice `sliceIndex` (default: where the shown curve peaks) of the volume
        the relevance belongs to, read from the relevance volume itself (works after a scene reload)."""
        volumeNode = self.sourceVolume(relevanceNode)
        if sliceIndex is None:
            return self.peakSliceRas(volumeNode, relevanceNode)
        sliceAxis = int(relevanceNode.GetAttribute("RadCLIP.sliceAxis") or 0)
        return self.sliceCentreRas(volumeNode, sliceAxis, int(sliceIndex))

    @staticmethod
    def sourceVolume(relevanceNode):
        """The volume a relevance volume was computed for."""
        if relevanceNode is None or relevanceNode.GetImageData() is None:
            raise RadCLIPError("rank the prompts first")
        volumeNode = relevanceNode.GetScene().GetNodeByID(relevanceNode.GetAttribute("RadCLIP.sourceVolumeID") or "")
        if volumeNode is None:
            raise RadCLIPError("the volume this relevance was computed for is no longer in the scene")
        return volumeNode

    def forget(self):
        """Drop the results kept for showing other prompts (the scene closed)."""
        self._results.clear()

    @staticmethod
    def _scene(outputs, run):
        for role in OUTPUT_ROLES:
            node = getattr(outputs, role, None)
            if node is not None and node.GetScene() is not None:
                return node.GetScene()
        return slicer.mrmlScene

    # ------------------------------------------------------------------ results (GUI thread: MRML writes)
    def showResults(self, volumeNode, result: dict, tableNode=None, relevanceNode=None, chartNode=None,
                    prompt: str | None = None) -> dict:
        """Fill (or create) the table, the relevance volume and the chart from a worker `result`.
        The viewers show `prompt`'s relevance (default: the best prompt). Returns the nodes and
        what the overlay shows."""
        scene, name = volumeNode.GetScene(), volumeNode.GetName()
        tableNode = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode")
        relevanceNode = relevanceNode or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
        chartNode = chartNode or scene.AddNewNodeByClass("vtkMRMLPlotChartNode")
        # named after the volume shown now (reused nodes would keep the first volume's name)
        for node, suffix in ((tableNode, "prompts"), (relevanceNode, "slice relevance"), (chartNode, "slices")):
            node.SetName(f"{name} {suffix}")
        self.fillTable(tableNode, [(None, result["prompts"])])
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
    def fillTable(tableNode, groups, segments: bool | None = None):
        """`groups` = [(segment name or None, prompts best first)]: columns prompt, probability,
        cosine, with a segment column in front when the groups are segments."""
        segments = any(name is not None for name, _ in groups) if segments is None else segments
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
    def showInViewers(volumeNode, relevanceNode, legendTitle: str = "slice relevance"):
        """Every slice viewer: `volumeNode` as background, its relevance as foreground (the colour
        table carries the opacity; see overlay.py; None clears the foreground), and a colour legend
        only while the overlay shows something. Pass the volume the relevance belongs to
        (`sourceVolume(relevanceNode)`), not the one selected now."""
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=relevanceNode,
                                         foregroundOpacity=FOREGROUND_OPACITY)
        if relevanceNode is None:
            return
        display = relevanceNode.GetDisplayNode()
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(relevanceNode)
        if display is not None and display.GetVisibility():
            if legend is None and relevanceNode.GetScene().IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
                legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(relevanceNode)
            if legend is not None:
                legend.SetTitleText(legendTitle)
                legend.SetVisibility(True)
        elif legend is not None:
            legend.SetVisibility(False)  # a flat, hidden overlay has nothing to explain

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
        sliceAxis = int(relevanceNode.GetAttribute("RadCLIP.sliceAxis") or 0)
        weights = slicer.util.arrayFromVolume(relevanceNode).ravel()
        return self.sliceCentreRas(volumeNode, sliceAxis, int(np.argmax(weights)))

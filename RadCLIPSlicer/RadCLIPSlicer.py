"""RadCLIP in 3D Slicer: rank text prompts for a volume and show which slices the model attended to.

Five parts, as in Slicer's scripted-module template: the module description, the parameter node
(the whole panel state and the output nodes, saved with the scene), the widget (loads
Resources/UI/RadCLIPSlicer.ui; widgets are bound through their SlicerParameterName), the logic
(no widgets; MRML work in RadCLIPSlicerLib), and the self-test.
"""
import os
import sys
import threading
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# RadCLIPCore is bundled beside this file in the built extension; in a source checkout it is one
# folder up. Only the path is set here: torch and RadCLIPCore are imported on first use.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "RadCLIPCore")) and _candidate not in sys.path:
        sys.path.append(_candidate)
        break

PRESET_LABELS = ["CLIP ViT-L/14 (OpenAI)", "RadCLIP 2D — published weights", "Local model folder…"]
DEFAULT_PROMPTS = "\n".join(["Brain MRI", "Head CT", "Chest CT", "Chest X-ray", "Abdomen CT", "Knee MRI",
                             "A puppy", "A cat", "A life vest"])
PROMPT_PRESETS = {
    "Modality": DEFAULT_PROMPTS,
    "Common findings": "\n".join(["Chest CT", "Chest CT with pneumonia", "Chest CT with lung nodule",
                                  "Chest CT with pleural effusion", "Brain MRI", "Brain MRI with tumor",
                                  "Brain MRI with stroke", "Abdomen CT with liver lesion"]),
}


#
# RadCLIPSlicer
#
class RadCLIPSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RadCLIP")
        self.parent.categories = [_("Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["RadCLIPSlicer contributors"]
        self.parent.helpText = _(
            "Rank text prompts (one per line) for a volume with a radiology vision-language model, and see "
            "the per-slice attention of the slice-pooling adapter over the slice viewers. Research use only, "
            "not for diagnosis. See the README of the RadCLIPSlicer extension.")
        self.parent.acknowledgementText = _(
            "RadCLIP: Z. Lu et al., 'RadCLIP: Enhancing Radiologic Image Analysis through Contrastive "
            "Language-Image Pre-training', IEEE TNNLS / arXiv:2403.09948. Built on Hugging Face transformers "
            "(CLIP) and 3D Slicer.")


#
# Parameter node: the whole panel state, and the output nodes
#
@parameterNodeWrapper
class RadCLIPSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    modelPreset: Annotated[str, Choice(PRESET_LABELS)] = PRESET_LABELS[0]
    modelFolder: str = ""
    offline: bool = False
    device: Annotated[str, Choice(["auto", "cpu", "cuda:0", "cuda:1", "cuda:2", "cuda:3"])] = "auto"
    plane: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    maxSlices: Annotated[int, WithinRange(0, 4096)] = 64  # 0 = every slice
    prompts: str = DEFAULT_PROMPTS
    outputTable: vtkMRMLTableNode
    segmentTable: vtkMRMLTableNode
    attentionVolume: vtkMRMLScalarVolumeNode
    attentionChart: vtkMRMLPlotChartNode


#
# Widget
#
class RadCLIPSlicerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._worker = None
        self._plotViewConnected = False
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadCLIPSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadCLIPSlicerLogic()

        for name in PROMPT_PRESETS:
            self.ui.promptPresetComboBox.addItem(name)
        self.ui.promptPresetComboBox.connect("activated(int)", self.onPromptPreset)
        self.ui.rankButton.connect("clicked(bool)", self.onRankButton)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpButton)
        self.ui.diagnosticsButton.connect("clicked(bool)", self.onDiagnostics)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.cacheLabel.text = _("Weights are cached in {path}").format(path=self.logic.huggingFaceCache())
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRank)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelWorker()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRank)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanRank)
            self._checkCanRank()

    def _checkCanRank(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._worker is not None
        ready = bool(p and p.inputVolume and p.prompts.strip())
        self.ui.rankButton.enabled = running or ready
        self.ui.rankButton.text = _("Cancel") if running else _("Rank prompts")
        self.ui.modelFolderLineEdit.enabled = bool(p) and p.modelPreset == PRESET_LABELS[2]
        self.ui.jumpButton.enabled = bool(p and p.attentionVolume and p.inputVolume)

    def onPromptPreset(self, index) -> None:
        self._parameterNode.prompts = PROMPT_PRESETS[self.ui.promptPresetComboBox.itemText(index)]

    def onDiagnostics(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not read the device diagnostics."), waitCursor=True):
            self.ui.statusLabel.text = self.logic.diagnostics()

    # ---------------------------------------------------------------- rank / cancel
    def onRankButton(self) -> None:
        if self._worker is not None:
            self.cancelWorker()
            self.ui.statusLabel.text = _("Cancelled.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to rank the prompts."), waitCursor=True):
            if not self.logic.ensureDependencies():
                self.ui.statusLabel.text = _("RadCLIP needs PyTorch and transformers; installation was declined.")
                return
            p = self._parameterNode
            self._worker = self.logic.startRanking(p)
            self.ui.progressBar.setRange(0, 0)  # busy
            self.ui.statusLabel.text = _("Embedding {name}…").format(name=p.inputVolume.GetName())
            self._timer.start()
            self._checkCanRank()

    def cancelWorker(self) -> None:
        if self._worker is not None:
            self._worker = None  # its result, when it comes, is dropped
        self._timer.stop()
        self.ui.progressBar.setRange(0, 1)
        self._checkCanRank()

    def _poll(self) -> None:
        """Runs on the GUI thread every 100 ms while the worker embeds in the background."""
        worker = self._worker
        if worker is None or not worker.done:
            return
        self._worker = None
        self._timer.stop()
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 1
        with slicer.util.tryWithErrorDisplay(_("Failed to rank the prompts."), waitCursor=True):
            if worker.error is not None:
                raise worker.error
            result = self.logic.finishRanking(self._parameterNode, worker.result)
            best = result["table"].GetCellText(0, 0)
            status = _("Best match: {prompt}. Most attended slice: {slice}.").format(
                prompt=best, slice=result["embedding"].most_attended_slice)
            missing = result.get("missing_segments")
            if missing:
                status += " " + _("Not ranked: {segments}.").format(
                    segments="; ".join(f"{name} ({why})" for name, why in missing.items()))
            self.ui.statusLabel.text = status
            self.logic.showResults(self._parameterNode)
            self._connectPlotClicks()
        self._checkCanRank()

    def _connectPlotClicks(self) -> None:
        """Clicking a point of the attention chart moves the slice viewers to that slice."""
        layoutManager = slicer.app.layoutManager()
        if self._plotViewConnected or layoutManager.plotViewCount == 0:
            return
        layoutManager.plotWidget(0).plotView().connect("dataPointClicked(QString,int)", self.onPlotPointClicked)
        self._plotViewConnected = True

    def onPlotPointClicked(self, plotSeriesNodeID, pointIndex) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not move the slice viewers."), waitCursor=False):
            self.logic.jumpToSlice(self._parameterNode, int(pointIndex))

    def onJumpButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not move the slice viewers."), waitCursor=False):
            self.logic.jumpToMostAttendedSlice(self._parameterNode)


#
# Logic
#
class _RankingWorker:
    """Embeds a volume on a background thread (torch releases the GIL); the GUI polls `done`.

    Cancel drops the worker: torch cannot be interrupted mid-batch, so a cancelled run finishes in
    the background and its result is never shown.
    """

    def __init__(self, run):
        self.done, self.error, self.result = False, None, None
        self._thread = threading.Thread(target=self._run, args=(run,), name="RadCLIP", daemon=True)
        self._thread.start()

    def _run(self, run):
        try:
            self.result = run()
        except Exception as exc:  # handed to the GUI thread
            self.error = exc
        self.done = True


class RadCLIPSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget, e.g. from the Python console:

        logic = slicer.util.getModuleLogic("RadCLIPSlicer")   # or RadCLIPSlicerLogic()
        table = logic.rank(volumeNode, ["Chest CT", "Brain MRI"], model="/path/to/model")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrmlLogic = None

    def getParameterNode(self):
        return RadCLIPSlicerParameterNode(super().getParameterNode())

    @property
    def mrmlLogic(self):
        if self._mrmlLogic is None:
            from RadCLIPSlicerLib import RadCLIPSlicerMRMLLogic

            self._mrmlLogic = RadCLIPSlicerMRMLLogic()
        return self._mrmlLogic

    # ---------------------------------------------------------------- dependencies (first use)
    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension (right CUDA build), the rest through pip_ensure."""
        try:
            import torch  # noqa: F401
        except ImportError:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension from the Extensions Manager, then restart."))
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=True) is None:
                return False
        import slicer.packaging

        try:
            slicer.packaging.pip_ensure(slicer.packaging.load_requirements(self.resourcePath("requirements.txt")),
                                        requester="RadCLIP")
        except RuntimeError as exc:
            if "declined" in str(exc).lower():
                return False
            raise
        return True

    def resourcePath(self, relativePath):
        return os.path.join(os.path.dirname(__file__), "Resources", relativePath)

    @staticmethod
    def huggingFaceCache() -> str:
        return os.environ.get("HF_HUB_CACHE") or os.path.join(
            os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")

    @staticmethod
    def diagnostics() -> str:
        import torch

        line = f"torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            line += f", {props.name}, {props.total_memory / 2 ** 30:.0f} GiB"
        else:
            line += ", no GPU visible"
        return line

    # ---------------------------------------------------------------- model and ranking
    @staticmethod
    def modelSource(parameterNode) -> str:
        from RadCLIPSlicerLib import MODEL_PRESETS

        source, needsFolder = MODEL_PRESETS[parameterNode.modelPreset]
        if needsFolder:
            if not parameterNode.modelFolder:
                raise ValueError(_("Choose a local model folder or .pth file."))
            return parameterNode.modelFolder
        return source

    @staticmethod
    def prompts(parameterNode) -> list:
        return [line.strip() for line in parameterNode.prompts.splitlines() if line.strip()]

    def loadModel(self, parameterNode):
        return self.mrmlLogic.loadModel(self.modelSource(parameterNode), device=parameterNode.device,
                                        offline=parameterNode.offline)

    def rank(self, volumeNode, prompts, model=None, plane="auto", maxSlices=None, parameterNode=None):
        """Synchronous ranking for scripts: fills the parameter node's outputs and returns the table node."""
        p = parameterNode or self.getParameterNode()
        p.inputVolume = volumeNode
        p.prompts = "\n".join(prompts)
        p.plane, p.maxSlices = plane, maxSlices or 0
        if model is not None:
            p.modelPreset, p.modelFolder = PRESET_LABELS[2], str(model)
        self.finishRanking(p, self._embedJob(p)())
        return p.outputTable

    def _embedJob(self, p):
        """MRML reads on this (GUI) thread; the returned job only computes, on the worker thread."""
        from RadCLIPCore.anatomy import anatomy_embeddings
        from RadCLIPSlicerLib import volumeFromNode

        volumeNode, plane, maxSlices = p.inputVolume, p.plane, (p.maxSlices or None)
        model = self.loadModel(p)
        labels = (self.mrmlLogic.labelMapFromSegmentation(p.inputSegmentation, volumeNode)
                  if p.inputSegmentation else None)

        def job():
            emb = self.mrmlLogic.embed(volumeNode, model, plane, maxSlices)
            anatomy = (anatomy_embeddings(model, volumeFromNode(volumeNode), labels, plane=plane, max_slices=maxSlices)
                       if labels is not None else None)
            return model, emb, anatomy

        return job

    def startRanking(self, parameterNode) -> _RankingWorker:
        if not self.prompts(parameterNode):
            raise ValueError(_("Type at least one prompt."))
        return _RankingWorker(self._embedJob(parameterNode))

    def finishRanking(self, p, result):
        """`result` = (model, VolumeEmbedding, AnatomyEmbeddings or None) from the embedding job:
        rank and fill the outputs (and the per-segment table when a segmentation is selected)."""
        model, emb, anatomy = result
        prompts = self.prompts(p)
        out = self.mrmlLogic.showResults(p.inputVolume, emb, model.rank(emb, prompts), p.outputTable,
                                         p.attentionVolume, p.attentionChart)
        p.outputTable, p.attentionVolume, p.attentionChart = out["table"], out["attention"], out["chart"]
        if anatomy is not None:
            segments = self.mrmlLogic.showSegmentResults(p.inputVolume, anatomy, model, prompts, p.segmentTable)
            p.segmentTable = segments["table"]
            out["missing_segments"] = segments["missing"]
        return out

    # ---------------------------------------------------------------- display
    def showResults(self, p) -> None:
        """Attention as the foreground layer over the input, the table and the chart in the layout."""
        slicer.util.setSliceViewerLayers(background=p.inputVolume, foreground=p.attentionVolume,
                                         foregroundOpacity=0.4)
        colorLegend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(p.attentionVolume)
        if colorLegend:
            colorLegend.SetTitleText(_("slice weight"))
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpPlotTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(p.outputTable.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        slicer.modules.plots.logic().ShowChartInLayout(p.attentionChart)

    def jumpToSlice(self, p, sliceIndex=None) -> None:
        """Centre the slice viewers on input slice `sliceIndex` (default: the most attended one)."""
        emb = self.mrmlLogic.cachedEmbedding(p.inputVolume, self.loadModel(p), p.plane, p.maxSlices or None)
        if emb is None:
            raise ValueError(_("Rank the prompts first."))
        index = emb.most_attended_slice if sliceIndex is None else sliceIndex
        ras = self.mrmlLogic.sliceCentreRas(p.inputVolume, emb, index)
        slicer.modules.markups.logic().JumpSlicesToLocation(*ras, True)

    def jumpToMostAttendedSlice(self, p) -> None:
        self.jumpToSlice(p)


#
# Test (runs inside Slicer: Developer Tools > Self Tests, or the module's Reload and Test button)
#
class RadCLIPSlicerTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RankWithTinyModel()

    def test_RankWithTinyModel(self):
        """Builds a tiny random CLIP locally (no download), ranks prompts for a synthetic volume."""
        import tempfile

        import numpy as np

        from RadCLIPCore import RadCLIPModel, save_model
        from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

        self.delayDisplay("Building a tiny model")
        tokenizer = bundled_tokenizer()
        folder = os.path.join(tempfile.mkdtemp(), "tiny")
        save_model(RadCLIPModel(new_clip_model("clip-tiny", tokenizer, seed=0), tokenizer), folder)
        volume = slicer.util.addVolumeFromArray(np.random.default_rng(0).normal(size=(20, 48, 40)).astype("float32"),
                                                name="synthetic")
        logic = RadCLIPSlicerLogic()
        table = logic.rank(volume, ["Brain MRI", "Chest CT", "A puppy"], model=folder, maxSlices=8)
        self.assertEqual(table.GetNumberOfRows(), 3)
        p = logic.getParameterNode()
        self.assertEqual(slicer.util.arrayFromVolume(p.attentionVolume).size, 20)
        self.delayDisplay("Test passed")

"""RadCLIP in 3D Slicer: rank text prompts for a volume and show where along the volume each matches.

Five parts, as in Slicer's scripted-module template: the module description, the parameter node
(the panel state and the output nodes, saved with the scene), the widget (loads
Resources/UI/RadCLIPSlicer.ui), the logic (no widgets), and the self-test.

All model work runs in a separate worker process (`PythonSlicer -m RadCLIPCore serve`, or a
command of the user's choice such as `ssh gpu-box ...`): Slicer's main thread holds the GIL while
idle, so a Python thread here would crawl, and a crash or out-of-memory in torch would take Slicer
down. The GUI thread only reads MRML (a view of the voxels, the IJK-to-RAS matrix), hands them to
the worker, polls for events with a timer and writes the results into MRML. It never imports torch.
"""
import importlib
import os
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

# RadCLIPCore is bundled beside this file in the built extension; in a source checkout it is one
# folder up. Only the path is set here, and only torch-free parts of it are imported by this process.
_HERE = os.path.dirname(os.path.abspath(__file__))
for _candidate in (_HERE, os.path.dirname(_HERE)):
    if os.path.isdir(os.path.join(_candidate, "RadCLIPCore")) and _candidate not in sys.path:
        sys.path.append(_candidate)
        break

from RadCLIPCore.presets import DISTRACTORS, LOCAL_MODEL_LABEL, PRESETS  # noqa: E402  (no torch: a small table)

MINIMUM_SLICER = (5, 10)  # Python 3.12: transformers 5 needs Python >= 3.11 (Slicer 5.8 ships 3.9)
TORCH_REQUIREMENT = ">=2.6"  # transformers 5 disables itself under torch < 2.6
MODEL_LABELS = [p.label for p in PRESETS] + [LOCAL_MODEL_LABEL]
DEFAULT_PROMPTS = "\n".join(["Brain MRI", "Head CT", "Chest CT", "Chest X-ray", "Abdomen CT", "Knee MRI", *DISTRACTORS])
PROMPT_PRESETS = {
    "Modality": DEFAULT_PROMPTS,
    "Common findings": "\n".join(["Chest CT", "Chest CT with pneumonia", "Chest CT with lung nodule",
                                  "Chest CT with pleural effusion", "Brain MRI", "Brain MRI with tumor",
                                  "Brain MRI with stroke", "Abdomen CT with liver lesion"]),
}
WORKER_COMMAND_SETTING = "RadCLIP/WorkerCommand"
# parameters deliberately not bound through SlicerParameterName: the prompt box (Slicer's QTextEdit
# connector rewrites the text on every keystroke and moves the cursor to 0), the device (its list
# comes from the worker at run time) and the output nodes (the module owns them; a selector would let
# a user pick the input CT as an output and overwrite it)
UNBOUND_PARAMETERS = ("prompts", "device", "outputTable", "segmentTable", "relevanceVolume", "relevanceChart")


#
# RadCLIPSlicer
#
class RadCLIPSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RadCLIP")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["RadCLIPSlicer maintainers (RadCLIPSlicer project)"]
        self.parent.helpText = _(
            "Rank text prompts (one per line) for a volume with a radiology vision-language model, and see "
            "where along the volume each prompt matches (per-slice relevance) and, for models with a "
            "slice-pooling adapter, which slices the model attended to. Per-slice weights are not "
            "segmentations. Research use only, not for diagnosis. Needs Slicer {version} or later."
        ).format(version=".".join(map(str, MINIMUM_SLICER)))
        self.parent.acknowledgementText = _(
            "RadCLIP: Z. Lu et al., 'RadCLIP: Enhancing Radiologic Image Analysis through Contrastive "
            "Language-Image Pre-training', IEEE TNNLS / arXiv:2403.09948. Built on Hugging Face transformers "
            "(CLIP) and 3D Slicer.")


def slicerVersionSupported() -> bool:
    return (slicer.app.majorVersion, slicer.app.minorVersion) >= MINIMUM_SLICER


#
# Parameter node: the panel state and the output nodes
#
@parameterNodeWrapper
class RadCLIPSlicerParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    inputSegmentation: vtkMRMLSegmentationNode
    modelPreset: Annotated[str, Choice(MODEL_LABELS)] = MODEL_LABELS[0]
    modelFolder: str = ""
    offline: bool = False
    device: str = "auto"
    plane: Annotated[str, Choice(["auto", "axial", "coronal", "sagittal"])] = "auto"
    maxSlices: Annotated[int, WithinRange(0, 4096)] = 64  # 0 = every slice
    prompts: str = DEFAULT_PROMPTS
    outputTable: vtkMRMLTableNode
    segmentTable: vtkMRMLTableNode
    relevanceVolume: vtkMRMLScalarVolumeNode
    relevanceChart: vtkMRMLPlotChartNode


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
        self._running = None  # id of the request in flight
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self._plotView = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/RadCLIPSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = RadCLIPSlicerLogic()
        if not slicerVersionSupported():
            self.ui.versionLabel.text = _("RadCLIP needs 3D Slicer {need} or later (this is {have}).").format(
                need=".".join(map(str, MINIMUM_SLICER)), have=slicer.app.applicationVersion)
            self.ui.versionLabel.visible = True
            for name in ("inputsCollapsibleButton", "modelCollapsibleButton", "promptsCollapsibleButton",
                         "outputsCollapsibleButton"):
                getattr(self.ui, name).enabled = False
            return

        for name in PROMPT_PRESETS:
            self.ui.promptPresetComboBox.addItem(name)
        self.ui.deviceComboBox.addItem("auto")
        self.ui.promptPresetComboBox.connect("activated(int)", self.onPromptPreset)
        self.ui.promptsTextEdit.connect("textChanged()", self.onPromptsEdited)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChosen)
        self.ui.rankButton.connect("clicked(bool)", self.onRankButton)
        self.ui.jumpButton.connect("clicked(bool)", self.onJumpButton)
        self.ui.unloadButton.connect("clicked(bool)", self.onUnloadButton)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onBrowseModel)
        self.ui.workerCommandLineEdit.text = qt.QSettings().value(WORKER_COMMAND_SETTING, "")
        self.ui.workerCommandLineEdit.connect("editingFinished()", self.onWorkerCommandEdited)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultRowSelected)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.cacheLabel.text = _("Downloaded weights are cached in {path}").format(path=self.logic.huggingFaceCache())
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.stopWorker()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRanking()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        if self.logic is None or not slicerVersionSupported():
            return
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None) -> None:
        """Parameter node -> the widgets it does not bind; enable states."""
        p = self._parameterNode
        if p is None:
            return
        if self.ui.promptsTextEdit.toPlainText() != p.prompts:  # compare first: never move the cursor
            self.ui.promptsTextEdit.setPlainText(p.prompts)
        if self.ui.deviceComboBox.findText(p.device) < 0:
            self.ui.deviceComboBox.addItem(p.device)
        self.ui.deviceComboBox.setCurrentText(p.device)
        # only when it changed: setting a table re-emits selectionChanged (the row's prompt would be
        # shown again on every parameter change)
        if self.ui.resultsTableView.mrmlTableNode() is not p.outputTable:
            self.ui.resultsTableView.setMRMLTableNode(p.outputTable)
        if self.ui.segmentTableView.mrmlTableNode() is not p.segmentTable:
            self.ui.segmentTableView.setMRMLTableNode(p.segmentTable)
        self.ui.segmentTableView.visible = bool(p.segmentTable and p.inputSegmentation)
        running = self._running is not None
        ready = bool(p.inputVolume and p.prompts.strip())
        self.ui.rankButton.enabled = running or ready
        self.ui.rankButton.text = _("Cancel") if running else _("Rank prompts")
        local = p.modelPreset == MODEL_LABELS[-1]
        self.ui.modelFolderLineEdit.enabled = self.ui.modelBrowseButton.enabled = local
        self.ui.jumpButton.enabled = bool(p.relevanceVolume and p.inputVolume)

    def onPromptsEdited(self) -> None:
        text = self.ui.promptsTextEdit.toPlainText()
        if self._parameterNode and self._parameterNode.prompts != text:
            self._parameterNode.prompts = text

    def onDeviceChosen(self, text) -> None:
        if self._parameterNode and text and self._parameterNode.device != text:
            self._parameterNode.device = text

    def onPromptPreset(self, index) -> None:
        self._parameterNode.prompts = PROMPT_PRESETS[self.ui.promptPresetComboBox.itemText(index)]

    def onBrowseModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("RadCLIP model folder"),
                                                     self._parameterNode.modelFolder or os.path.expanduser("~"))
        if folder:
            self._parameterNode.modelFolder = folder

    def onWorkerCommandEdited(self) -> None:
        command = self.ui.workerCommandLineEdit.text.strip()
        qt.QSettings().setValue(WORKER_COMMAND_SETTING, command)
        self.logic.setWorkerCommand(command)

    # ---------------------------------------------------------------- rank / cancel
    def onRankButton(self) -> None:
        if self._running is not None:
            self.cancelRanking()
            return
        try:
            with slicer.util.tryWithErrorDisplay(_("Failed to rank the prompts."), waitCursor=True):
                if not self.logic.ensureDependencies():
                    self.ui.statusLabel.text = _("RadCLIP needs PyTorch and transformers; installation was declined.")
                    return
                self.logic.setWorkerCommand(self.ui.workerCommandLineEdit.text.strip())
                self._running = self.logic.startRanking(self._parameterNode)
                self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
                self.ui.statusLabel.text = _("Starting…")
                self._timer.start()
        finally:
            self._updateGui()

    def cancelRanking(self) -> None:
        if self._running is not None and self.logic is not None:
            self.logic.cancel(self._running)
            self.ui.statusLabel.text = _("Cancelling…")

    def _poll(self) -> None:
        """GUI thread, every 100 ms while a request runs: progress, then the result or an error."""
        for event in self.logic.poll():
            if event.get("event") == "pong":
                self._setDevices(event.get("devices", []))
            if event.get("id") != self._running:
                continue
            kind = event.get("event")
            if kind == "progress":
                self._showProgress(event)
                continue
            self._finish(event)

    def _showProgress(self, event) -> None:
        total = event.get("total")
        if total:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.value = event.get("done", 0)
        self.ui.statusLabel.text = {"loading model": _("Loading the model (a first use downloads it)…"),
                                    "embedding slices": _("Embedding slices…"),
                                    "ranking prompts": _("Ranking the prompts…")}.get(event.get("stage"), "")

    def _finish(self, event) -> None:
        self._running = None
        self._timer.stop()
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 1 if event.get("event") == "result" else 0
        try:
            kind = event.get("event")
            if kind == "cancelled":
                self.ui.statusLabel.text = _("Cancelled.")
            elif kind == "error":
                self.ui.statusLabel.text = event.get("message", "")
                slicer.util.errorDisplay(_("Failed to rank the prompts: {message}").format(message=event.get("message")))
            elif kind == "result":
                with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
                    self.ui.resultsTableView.clearSelection()  # the best prompt is shown first
                    self.ui.statusLabel.text = self.logic.finishRanking(self._parameterNode, event["result"])
                    self.logic.showResults(self._parameterNode, slicer.app.layoutManager().plotViewCount > 0)
                    self._plotViewReady()  # now there is a plot view: connect its clicks
        finally:
            self._updateGui()

    def _setDevices(self, devices) -> None:
        current = self.ui.deviceComboBox.currentText
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)  # refilling must not rewrite the parameter
        self.ui.deviceComboBox.clear()
        for device in ["auto"] + [d for d in devices if d != "auto"]:
            self.ui.deviceComboBox.addItem(device)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self.ui.deviceComboBox.setCurrentText(current if self.ui.deviceComboBox.findText(current) >= 0 else "auto")
        self.onDeviceChosen(self.ui.deviceComboBox.currentText)

    # ---------------------------------------------------------------- viewers
    def _plotViewReady(self) -> bool:
        """Connect chart clicks once there is a plot view: a click moves the viewers to that slice."""
        layoutManager = slicer.app.layoutManager()
        if layoutManager.plotViewCount == 0:
            return False
        plotView = layoutManager.plotWidget(0).plotView()
        if plotView is not self._plotView:
            plotView.connect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
            self._plotView = plotView
        return True

    def onPlotDataSelected(self, seriesIds, selection) -> None:
        """A clicked chart point: its index is the slice number (copy it: the arguments are temporary)."""
        points = [selection.GetItemAsObject(i) for i in range(selection.GetNumberOfItems())]
        indices = [int(p.GetValue(k)) for p in points if p is not None for k in range(p.GetNumberOfValues())]
        if indices:
            with slicer.util.tryWithErrorDisplay(_("Could not move the slice viewers."), waitCursor=False):
                self.logic.jumpToSlice(self._parameterNode, indices[0])

    def onResultRowSelected(self) -> None:
        rows = sorted({index.row() for index in self.ui.resultsTableView.selectionModel().selectedIndexes()})
        if not rows or self._parameterNode is None or self._parameterNode.outputTable is None:
            return
        prompt = self._parameterNode.outputTable.GetCellText(rows[0], 0)
        with slicer.util.tryWithErrorDisplay(_("Could not show this prompt."), waitCursor=False):
            self.ui.statusLabel.text = self.logic.showPrompt(self._parameterNode, prompt)

    def onJumpButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not move the slice viewers."), waitCursor=False):
            self.logic.jumpToSlice(self._parameterNode)

    def onUnloadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not unload the model."), waitCursor=False):
            self.logic.unload()
            self.ui.statusLabel.text = _("Model unloaded: its memory is free again.")


#
# Logic
#
class RadCLIPSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget, e.g. from the Python console:

        logic = slicer.util.getModuleLogic("RadCLIPSlicer")   # or RadCLIPSlicerLogic()
        table = logic.rankVolume(volumeNode, ["Chest CT", "Brain MRI"], model="/path/to/model")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrmlLogic = None
        self._client = None
        self._workerCommand = ""
        self._result = None  # the last worker result: per-prompt relevance for row selection

    def getParameterNode(self):
        return RadCLIPSlicerParameterNode(super().getParameterNode())

    @property
    def mrmlLogic(self):
        if self._mrmlLogic is None:
            from RadCLIPSlicerLib import RadCLIPSlicerMRMLLogic

            self._mrmlLogic = RadCLIPSlicerMRMLLogic()
        return self._mrmlLogic

    # ---------------------------------------------------------------- the worker process
    def setWorkerCommand(self, command: str) -> None:
        """'' = this Slicer's Python. Any other command (e.g. over ssh) gets the voxels inline."""
        if command != self._workerCommand:
            self.stopWorker()
            self._workerCommand = command

    @property
    def client(self):
        if self._client is None:
            import shutil

            from RadCLIPSlicerLib.client import WorkerClient, default_command

            command = self._workerCommand or default_command(shutil.which("PythonSlicer") or sys.executable)
            self._client = WorkerClient(command, transport="inline" if self._workerCommand else "file")
            self._client.request("ping")  # the devices it sees fill the device list
        return self._client

    def stopWorker(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def poll(self) -> list:
        return self.client.poll() if self._client is not None else []

    def cancel(self, requestId) -> None:
        if self._client is not None:
            self._client.cancel(requestId)

    def unload(self) -> None:
        if self._client is not None and self._client.running:
            self._client.request("unload")

    # ---------------------------------------------------------------- dependencies (first use)
    def ensureDependencies(self) -> bool:
        """torch through the PyTorch extension (the right CUDA build), the rest through pip; checked by
        package metadata, so torch is never imported into Slicer's own process."""
        from importlib import metadata

        try:
            metadata.version("torch")
        except metadata.PackageNotFoundError:
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("Install the PyTorch extension from the Extensions Manager, then restart."))
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True,
                                                             torchVersionRequirement=TORCH_REQUIREMENT) is None:
                return False
        from packaging.version import Version

        if Version(metadata.version("torch").split("+")[0]) < Version(TORCH_REQUIREMENT.lstrip(">=")):
            raise RuntimeError(_("RadCLIP needs torch {need}; this Slicer has {have}. Update it with the PyTorch "
                                 "extension (PyTorch Utils module).").format(need=TORCH_REQUIREMENT,
                                                                            have=metadata.version("torch")))
        requirements = self.resourcePath("requirements.txt")
        try:  # not `import slicer.packaging`: that would make `slicer` a local name of this function
            packaging = importlib.import_module("slicer.packaging")  # Slicer 5.12 and later
        except ImportError:  # 5.10: no prompt; pip runs only when something is missing
            if self._missingRequirements(requirements):
                slicer.util.pip_install(["-r", requirements])
            return True
        try:
            packaging.pip_ensure(packaging.load_requirements(requirements), requester="RadCLIP")
        except RuntimeError as exc:
            if "declined" in str(exc).lower():
                return False
            raise
        return True

    @staticmethod
    def _missingRequirements(path) -> list:
        """Requirement lines of `path` whose package is not installed or whose version does not fit."""
        from importlib import metadata

        from packaging.requirements import Requirement

        missing = []
        for line in open(path, encoding="utf-8").read().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                requirement = Requirement(line)
                try:
                    if not requirement.specifier.contains(metadata.version(requirement.name), prereleases=True):
                        missing.append(line)
                except metadata.PackageNotFoundError:
                    missing.append(line)
        return missing

    def resourcePath(self, relativePath):
        return os.path.join(os.path.dirname(__file__), "Resources", relativePath)

    @staticmethod
    def huggingFaceCache() -> str:
        from RadCLIPCore.presets import hub_cache_dir

        return hub_cache_dir()

    # ---------------------------------------------------------------- ranking
    @staticmethod
    def modelSource(parameterNode) -> str:
        from RadCLIPCore.presets import resolve_preset

        if parameterNode.modelPreset == MODEL_LABELS[-1]:
            if not parameterNode.modelFolder:
                raise ValueError(_("Choose a local model folder or .pth file."))
            return parameterNode.modelFolder
        return resolve_preset(parameterNode.modelPreset)

    @staticmethod
    def prompts(parameterNode) -> list:
        return [line.strip() for line in parameterNode.prompts.splitlines() if line.strip()]

    def startRanking(self, p) -> int:
        """Read the scene (GUI thread) and send one rank request; returns its id."""
        prompts = self.prompts(p)
        if not prompts:
            raise ValueError(_("Type at least one prompt."))
        if p.inputVolume is not None and p.inputVolume.GetAttribute("RadCLIP.sourceVolumeID"):
            raise ValueError(_("'{name}' is RadCLIP's own relevance volume; choose the scan as input.").format(
                name=p.inputVolume.GetName()))
        fields = self.mrmlLogic.volumeRequest(p.inputVolume, p.inputSegmentation)
        return self.client.send_rank(prompts, model=self.modelSource(p), device=p.device, offline=p.offline,
                                plane=p.plane, max_slices=p.maxSlices, **fields)

    def finishRanking(self, p, result) -> str:
        """Fill the output nodes from a worker result; returns a one-line status."""
        self._result = result
        out = self.mrmlLogic.showResults(p.inputVolume, result, p.outputTable, p.relevanceVolume, p.relevanceChart)
        p.outputTable, p.relevanceVolume, p.relevanceChart = out["table"], out["relevance"], out["chart"]
        status = _("Best match: {prompt} ({probability:.0%}).").format(prompt=result["prompts"][0]["text"],
                                                                       probability=result["prompts"][0]["probability"])
        status += " " + self._shownText(out)
        if "segments" in result or "missing_segments" in result:
            segments = self.mrmlLogic.showSegmentResults(p.inputVolume, result, p.segmentTable)
            p.segmentTable = segments["table"]
            if segments["missing"]:
                status += " " + _("Not ranked: {segments}.").format(
                    segments="; ".join(f"{name} ({why})" for name, why in segments["missing"].items()))
        return status

    @staticmethod
    def _shownText(shown) -> str:
        if not shown["overlay_visible"]:
            return _("'{prompt}' matches every slice alike: nothing to show over the viewers.").format(
                prompt=shown["prompt"])
        return _("Shown: where '{prompt}' matches (peak at slice {slice}).").format(prompt=shown["prompt"],
                                                                                 slice=shown["peak_slice"])

    def showPrompt(self, p, prompt) -> str:
        """Show another ranked prompt's relevance over the viewers and in the chart."""
        if self._result is None:
            raise ValueError(_("Rank the prompts first (results are kept until the module is reloaded)."))
        return self._shownText(self.mrmlLogic.showPrompt(p.inputVolume, self._result, prompt, p.relevanceVolume,
                                                         p.relevanceChart))

    def rankVolume(self, volumeNode, prompts, model=None, plane="auto", maxSlices=None, parameterNode=None, timeout=600):
        """Synchronous ranking for scripts: fills the parameter node's outputs and returns the table node."""
        p = parameterNode or self.getParameterNode()
        p.inputVolume = volumeNode
        p.prompts = "\n".join(prompts)
        p.plane, p.maxSlices = plane, maxSlices or 0
        if model is not None:
            p.modelPreset, p.modelFolder = MODEL_LABELS[-1], str(model)
        event = self.client.wait(self.startRanking(p), timeout=timeout)
        if event["event"] != "result":
            raise RuntimeError(event.get("message") or event["event"])
        self.finishRanking(p, event["result"])
        return p.outputTable

    # ---------------------------------------------------------------- display
    def showResults(self, p, plotViewInLayout: bool) -> None:
        """Relevance as the foreground layer over the input; the chart in the layout. The layout is
        changed only when it has no plot view (the user's layout otherwise stays as it is)."""
        slicer.util.setSliceViewerLayers(background=p.inputVolume, foreground=p.relevanceVolume,
                                         foregroundOpacity=0.5)
        colorLegend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(p.relevanceVolume)
        if colorLegend:
            colorLegend.SetTitleText(_("slice weight"))
        if not plotViewInLayout:
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)
        slicer.modules.plots.logic().ShowChartInLayout(p.relevanceChart)

    def jumpToSlice(self, p, sliceIndex=None) -> None:
        """Centre the slice viewers on input slice `sliceIndex` (default: where the shown curve peaks),
        from the relevance volume itself: no model and no worker needed."""
        if sliceIndex is None:
            ras = self.mrmlLogic.peakSliceRas(p.inputVolume, p.relevanceVolume)
        else:
            sliceAxis = int(p.relevanceVolume.GetAttribute("RadCLIP.sliceAxis") or 0)
            ras = self.mrmlLogic.sliceCentreRas(p.inputVolume, sliceAxis, sliceIndex)
        slicer.modules.markups.logic().JumpSlicesToLocation(*ras, True)


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
        """Builds a tiny random CLIP (no download) and ranks prompts for a synthetic volume through a
        real worker process. Skipped where torch/transformers are absent (e.g. the extension build
        factory, whose Slicer has no torch and where pip installs nothing in testing mode)."""
        import importlib.util
        import tempfile

        missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
        if missing:
            self.delayDisplay(f"RadCLIP model test skipped: {', '.join(missing)} not installed in this Slicer")
            return
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
        try:
            table = logic.rankVolume(volume, ["Brain MRI", "Chest CT", "A puppy"], model=folder, maxSlices=8)
            self.assertEqual(table.GetNumberOfRows(), 3)
            p = logic.getParameterNode()
            self.assertEqual(slicer.util.arrayFromVolume(p.relevanceVolume).size, 20)
        finally:
            logic.stopWorker()
        self.delayDisplay("Test passed")

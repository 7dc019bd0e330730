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
MODEL_LABELS = [p.label for p in PRESETS] + [LOCAL_MODEL_LABEL]
DEFAULT_PROMPTS = "\n".join(["Brain MRI", "Head CT", "Chest CT", "Chest X-ray", "Abdomen CT", "Knee MRI", *DISTRACTORS])
PROMPT_PRESETS = {
    "Modality": DEFAULT_PROMPTS,
    "Common findings": "\n".join(["Chest CT", "Chest CT with pneumonia", "Chest CT with lung nodule",
                                  "Chest CT with pleural effusion", "Brain MRI", "Brain MRI with tumor",
                                  "Brain MRI with stroke", "Abdomen CT with liver lesion"]),
}
MODES = ["Rank prompts", "Findings"]
DEFAULT_FINDINGS = "\n".join(["pleural effusion", "lung nodule", "pneumonia", "cardiomegaly", "liver lesion"])
FINDING_PRESETS = {
    "Chest CT": DEFAULT_FINDINGS,
    "Abdomen CT": "\n".join(["liver lesion", "kidney stone", "ascites", "splenomegaly", "gallstones"]),
    "Brain": "\n".join(["hemorrhage", "infarct", "mass", "hydrocephalus"]),
}
WORKER_COMMAND_SETTING = "RadCLIP/WorkerCommand"
# parameters deliberately not bound through SlicerParameterName: the prompt box (Slicer's QTextEdit
# connector rewrites the text on every keystroke and moves the cursor to 0), the device (its list
# comes from the worker at run time) and the output nodes (the module owns them; a selector would let
# a user pick the input CT as an output and overwrite it)
UNBOUND_PARAMETERS = ("prompts", "findings", "device", "outputTable", "segmentTable", "relevanceVolume",
                      "relevanceChart", "findingsTable")


#
# RadCLIPSlicer
#
class RadCLIPSlicer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RadCLIP")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Informatics")]
        self.parent.dependencies = []
        self.parent.contributors = ["RadCLIPSlicer contributors (RadCLIPSlicer project)"]
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
    mode: Annotated[str, Choice(MODES)] = MODES[0]
    prompts: str = DEFAULT_PROMPTS
    findings: str = DEFAULT_FINDINGS  # one finding per line (the prompt box shows these in Findings mode)
    outputTable: vtkMRMLTableNode
    findingsTable: vtkMRMLTableNode
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
        self._running = None  # the RankingRun in flight
        self._unloading = None  # id of an unload request the worker has not answered yet
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

        # the mode and plane lists come from their Choice annotations (parameterNodeWrapper fills bound combo boxes)
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
        self.ui.findingsTableView.connect("selectionChanged()", self.onFindingRowSelected)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.cacheLabel.text = _("Downloaded weights are cached in {path}").format(path=self.logic.huggingFaceCache())
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Module reload or application exit: nothing here waits for the worker."""
        self._timer.stop()
        self.removeObservers()
        if self._plotView is not None:  # the old widget's slot must not outlive a reload
            self._plotView.disconnect("dataSelected(vtkStringArray*, vtkCollection*)", self.onPlotDataSelected)
            self._plotView = None
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
        """A result that arrives after the scene closed has no nodes to go to: forget the run."""
        self.cancelRanking()
        self._running = None
        self.logic.forgetResults()
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
        findings = p.mode == MODES[1]
        text = p.findings if findings else p.prompts
        if self.ui.promptsTextEdit.toPlainText() != text:  # compare first: never move the cursor
            self.ui.promptsTextEdit.setPlainText(text)
        presets = list(FINDING_PRESETS if findings else PROMPT_PRESETS)
        if [self.ui.promptPresetComboBox.itemText(i) for i in range(self.ui.promptPresetComboBox.count)] != presets:
            wasBlocked = self.ui.promptPresetComboBox.blockSignals(True)
            self.ui.promptPresetComboBox.clear()
            for name in presets:
                self.ui.promptPresetComboBox.addItem(name)
            self.ui.promptPresetComboBox.blockSignals(wasBlocked)
        self.ui.promptsTextEdit.toolTip = _("One finding per line.") if findings else _("One prompt per line.")
        if self.ui.deviceComboBox.findText(p.device) < 0:
            self.ui.deviceComboBox.addItem(p.device)
        self.ui.deviceComboBox.setCurrentText(p.device)
        # only when it changed: setting a table re-emits selectionChanged (the row's prompt would be
        # shown again on every parameter change)
        if self.ui.resultsTableView.mrmlTableNode() is not p.outputTable:
            self.ui.resultsTableView.setMRMLTableNode(p.outputTable)
        if self.ui.segmentTableView.mrmlTableNode() is not p.segmentTable:
            self.ui.segmentTableView.setMRMLTableNode(p.segmentTable)
        if self.ui.findingsTableView.mrmlTableNode() is not p.findingsTable:
            self.ui.findingsTableView.setMRMLTableNode(p.findingsTable)
        self.ui.segmentTableView.visible = bool(p.segmentTable and p.inputSegmentation) and not findings
        self.ui.resultsTableView.visible = not findings
        self.ui.findingsTableView.visible = bool(p.findingsTable) and findings
        running = self._running is not None
        # a result belongs to its request: the inputs stay as they are until it has arrived
        for name in ("inputVolumeSelector", "inputSegmentationSelector", "modelPresetComboBox", "planeComboBox",
                     "maxSlicesSpinBox", "modeComboBox"):
            getattr(self.ui, name).enabled = not running
        ready = bool(p.inputVolume and text.strip())
        self.ui.rankButton.enabled = running or ready
        self.ui.rankButton.text = _("Cancel") if running else (_("Score findings") if findings else _("Rank prompts"))
        local = p.modelPreset == MODEL_LABELS[-1] and not running
        self.ui.modelFolderLineEdit.enabled = self.ui.modelBrowseButton.enabled = local
        self.ui.jumpButton.enabled = bool(p.relevanceVolume and p.inputVolume)

    def onPromptsEdited(self) -> None:
        text = self.ui.promptsTextEdit.toPlainText()
        field = "findings" if self._parameterNode and self._parameterNode.mode == MODES[1] else "prompts"
        if self._parameterNode and getattr(self._parameterNode, field) != text:
            setattr(self._parameterNode, field, text)

    def onDeviceChosen(self, text) -> None:
        if self._parameterNode and text and self._parameterNode.device != text:
            self._parameterNode.device = text

    def onPromptPreset(self, index) -> None:
        name = self.ui.promptPresetComboBox.itemText(index)
        if self._parameterNode.mode == MODES[1]:
            self._parameterNode.findings = FINDING_PRESETS[name]
        else:
            self._parameterNode.prompts = PROMPT_PRESETS[name]

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
                # first the worker command: a remote worker needs nothing installed in this Slicer
                self.logic.setWorkerCommand(self.ui.workerCommandLineEdit.text.strip())
                if not self.logic.ensureDependencies():
                    self.ui.statusLabel.text = _("RadCLIP needs PyTorch and transformers; installation was declined.")
                    return
                start = self.logic.startFindings if self._parameterNode.mode == MODES[1] else self.logic.startRanking
                self._running = start(self._parameterNode)
                self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
                self.ui.statusLabel.text = _("Starting…")
                self._timer.start()
        finally:
            self._updateGui()

    def cancelRanking(self) -> None:
        if self._running is not None and self.logic is not None:
            self.logic.cancel(self._running.requestId)
            self.ui.statusLabel.text = _("Cancelling…")

    def _poll(self) -> None:
        """GUI thread, every 100 ms while a request runs: progress, then the result or an error.
        Only this panel's requests: a script's requests keep their own events."""
        from RadCLIPCore import protocol as P

        ids = [self.logic.pingId, self._unloading] + ([self._running.requestId] if self._running else [])
        for event in self.logic.poll([i for i in ids if i is not None]):
            kind = event.get("event")
            if kind == P.PONG:
                self._setDevices(event.get("devices", []), event.get("cpu_precision"))
            elif event.get("id") == self._unloading and kind in P.FINAL_EVENTS:
                self._unloading = None
                self.ui.statusLabel.text = (_("Model unloaded: its memory is free again.") if kind == P.UNLOADED
                                            else event.get("message") or _("The worker stopped."))
            elif self._running is not None and event.get("id") == self._running.requestId:
                if kind == P.PROGRESS:
                    self._showProgress(event)
                elif kind == P.PROVISIONAL:
                    self._showProvisional(event)
                elif kind in P.FINAL_EVENTS:
                    self._finish(event)
        if self._running is None and self._unloading is None:
            self._timer.stop()

    def _showProgress(self, event) -> None:
        from RadCLIPCore import protocol as P

        total = event.get("total")
        if total:
            self.ui.progressBar.setRange(0, total)
            self.ui.progressBar.value = event.get("done", 0)
        self.ui.statusLabel.text = {P.LOADING_MODEL: _("Loading the model (a first use downloads it)…"),
                                    P.EMBEDDING_SLICES: _("Embedding slices…"),
                                    P.RANKING_PROMPTS: _("Ranking the prompts…")}.get(event.get("stage"), "")

    def _showProvisional(self, event) -> None:
        """The worker's early answer (a subset of the slices): shown, marked provisional, until the
        result replaces it. The run goes on."""
        if self._parameterNode is None or self._running is None or self._running.kind != "rank":
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to show the provisional ranking."), waitCursor=True):
            self.ui.resultsTableView.clearSelection()
            self.ui.statusLabel.text = self.logic.finishRanking(self._parameterNode, self._running, event["result"],
                                                                provisional=(event.get("slices"), event.get("total")))
            self.logic.showResults(self._parameterNode)
            self._plotViewReady()

    def _finish(self, event) -> None:
        run, self._running = self._running, None
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 1 if event.get("event") == "result" else 0
        try:
            kind = event.get("event")
            if kind == "cancelled":
                self.ui.statusLabel.text = _("Cancelled.")
            elif kind == "error":
                self.ui.statusLabel.text = event.get("message", "")
                slicer.util.errorDisplay(_("Failed to rank the prompts: {message}").format(message=event.get("message")))
            elif kind == "result" and self._parameterNode is not None:
                with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
                    self.ui.resultsTableView.clearSelection()  # the best prompt is shown first
                    self.ui.findingsTableView.clearSelection()
                    finish = self.logic.finishFindings if run.kind == "findings" else self.logic.finishRanking
                    self.ui.statusLabel.text = finish(self._parameterNode, run, event["result"])
                    self.logic.showResults(self._parameterNode)
                    self._plotViewReady()  # now there is a plot view: connect its clicks
        finally:
            self._updateGui()

    def _setDevices(self, devices, cpuPrecision=None) -> None:
        if cpuPrecision:
            self.ui.deviceComboBox.toolTip = _("On the CPU this worker runs the model in {precision} "
                                               "(chosen for this CPU); on a GPU in bf16.").format(precision=cpuPrecision)
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

    def onFindingRowSelected(self) -> None:
        rows = sorted({index.row() for index in self.ui.findingsTableView.selectionModel().selectedIndexes()})
        if not rows or self._parameterNode is None or self._parameterNode.findingsTable is None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not show this finding."), waitCursor=False):
            self.ui.statusLabel.text = self.logic.showFinding(self._parameterNode, rows[0])

    def onJumpButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not move the slice viewers."), waitCursor=False):
            self.logic.jumpToSlice(self._parameterNode)

    def onUnloadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not unload the model."), waitCursor=False):
            self._unloading = self.logic.unload()
            if self._unloading is None:
                self.ui.statusLabel.text = _("No model is loaded.")
                return
            self.ui.statusLabel.text = _("Unloading the model…")  # said done when the worker answers
            self._timer.start()


#
# Logic
#
class RadCLIPSlicerLogic(ScriptedLoadableModuleLogic):
    """Usable without the widget, e.g. from the Python console:

        logic = slicer.util.getModuleLogic("RadCLIPSlicer")   # or RadCLIPSlicerLogic()
        table = logic.rankVolume(volumeNode, ["Chest CT", "Brain MRI"], model="/path/to/model")

    What a result looks like in the scene is decided in one place, RadCLIPSlicerLib's
    RadCLIPSlicerMRMLLogic; this class adds the worker process and the application (layout, chart).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._mrmlLogic = None
        self._client = None
        self._workerCommand = ""
        self.pingId = None

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
            self.pingId = self._client.request("ping")  # the devices it sees fill the device list
        return self._client

    def stopWorker(self) -> None:
        """Returns at once: the worker is asked to exit and killed if it does not (see WorkerClient)."""
        if self._client is not None:
            self._client.close()
            self._client = None
            self.pingId = None

    def poll(self, ids) -> list:
        return self._client.poll(ids) if self._client is not None else []

    def cancel(self, requestId) -> None:
        if self._client is not None:
            self._client.cancel(requestId)

    def unload(self):
        """Ask the worker to free its models; returns the request id (None: no worker runs)."""
        if self._client is not None and self._client.running:
            return self._client.request("unload")
        return None

    def forgetResults(self) -> None:
        self.mrmlLogic.forget()

    # ---------------------------------------------------------------- dependencies (first use)
    def ensureDependencies(self) -> bool:
        """What the worker needs in this Slicer's Python, asked for once and then installed: torch (the
        build for this machine, chosen by light-the-torch, without torchvision) and the packages of
        requirements.txt. Nothing for a remote worker. Checked from package metadata and installed in
        subprocesses: torch is never imported into Slicer's process. Returns False if declined."""
        from RadCLIPSlicerLib.dependencies import TORCH_REQUIREMENT, missingForWorker

        requirements = self.resourcePath("requirements.txt")
        missing = missingForWorker(requirements, self._workerCommand)
        if not missing["torch"] and not missing["packages"]:
            return True
        if slicer.app.testingEnabled():  # the build factory's self-tests install nothing
            return False
        lines = missing["torch"] + missing["packages"]
        if not slicer.util.confirmOkCancelDisplay(
                _("RadCLIP's worker needs {count} Python package(s) in this Slicer. Install them now "
                  "(PyTorch is a large download)?").format(count=len(lines)),
                _("RadCLIP - Install Python Packages"), detailedText="\n".join(lines)):
            return False
        if missing["torch"]:  # light-the-torch picks the CUDA build this machine's driver runs
            slicer.util.pip_install("light-the-torch>=0.8")
            run = getattr(slicer.util, "executePythonModule", None) or slicer.util._executePythonModule  # 5.10
            run("light_the_torch", ["install", TORCH_REQUIREMENT])
        if missing["packages"]:
            slicer.util.pip_install(["-r", requirements])
        still = missingForWorker(requirements, self._workerCommand)
        if still["torch"] or still["packages"]:
            raise RuntimeError(_("Could not install {packages}: see the Python console.").format(
                packages=", ".join(still["torch"] + still["packages"])))
        return True

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

    def startRanking(self, p):
        """Read the scene (GUI thread) and send one rank request; returns its RankingRun (the nodes it
        was made for)."""
        return self.mrmlLogic.startRanking(self.client, p.inputVolume, self.prompts(p), p.inputSegmentation,
                                           model=self.modelSource(p), device=p.device, offline=p.offline,
                                           plane=p.plane, max_slices=p.maxSlices)

    def finishRanking(self, p, run, result, provisional=None) -> str:
        """Fill the parameter node's output nodes from a worker result, on the run's volume; returns a
        one-line status (with what could not be shown, and why). `provisional`: (slices embedded,
        slices to embed) of an early answer, shown marked provisional."""
        shown = self.mrmlLogic.finishRanking(run, result, p, provisional=provisional is not None)
        status = _("Best match: {prompt} ({probability:.0%}).").format(prompt=shown["best"]["text"],
                                                                       probability=shown["best"]["probability"])
        if provisional is not None:
            status = _("Provisional, from {slices} of {total} slices (refining…): ").format(
                slices=provisional[0], total=provisional[1]) + status
        elif result.get("precision"):
            status += " " + _("Model in {precision}.").format(precision=result["precision"])
        status += " " + self._shownText(shown)
        if shown["segmentError"]:
            status += " " + _("Per segment: {why}.").format(why=shown["segmentError"])
        elif shown["missing"]:
            status += " " + _("Not ranked: {segments}.").format(
                segments="; ".join(f"{name} ({why})" for name, why in shown["missing"].items()))
        return status

    @staticmethod
    def _shownText(shown) -> str:
        if not shown["overlay_visible"]:
            return _("'{prompt}' matches every slice alike: nothing to show over the viewers.").format(
                prompt=shown["prompt"])
        return _("Shown: where '{prompt}' matches (peak at slice {slice}).").format(prompt=shown["prompt"],
                                                                                 slice=shown["peak_slice"])

    def startFindings(self, p):
        """Send one findings request (each line of the findings box is a finding); returns its run."""
        findings = [line.strip() for line in p.findings.splitlines() if line.strip()]
        return self.mrmlLogic.startFindings(self.client, p.inputVolume, findings, p.inputSegmentation,
                                            model=self.modelSource(p), device=p.device, offline=p.offline,
                                            plane=p.plane, max_slices=p.maxSlices)

    def finishFindings(self, p, run, result) -> str:
        """Fill the findings table and show the first finding's evidence; returns a one-line status."""
        shown = self.mrmlLogic.finishFindings(run, result, p)
        status = _("{rows} finding(s) scored.").format(rows=shown["rows"])
        if result.get("precision"):
            status += " " + _("Model in {precision}.").format(precision=result["precision"])
        status += " " + (_("Operating points: {file}.").format(file=shown["thresholds"]) if shown["thresholds"]
                         else _("No operating points: probabilities only (uncalibrated)."))
        if shown["missing"]:
            status += " " + _("Not scored: {anatomies}.").format(
                anatomies="; ".join(f"{name} ({why})" for name, why in shown["missing"].items()))
        if shown["unknown"]:
            status += " " + _("Segments no anatomy names: {segments}.").format(segments=", ".join(shown["unknown"]))
        return status + " " + self._shownText(shown)

    def showFinding(self, p, row) -> str:
        shown = self.mrmlLogic.showFindingOf(p, row)
        self.showResults(p)
        return self._shownText(shown)

    def showPrompt(self, p, prompt) -> str:
        """Show another ranked prompt's relevance over the viewers and in the chart (on the volume the
        result belongs to)."""
        shown = self.mrmlLogic.showPromptOf(p, prompt)
        self.showResults(p)  # the legend follows the overlay's visibility
        return self._shownText(shown)

    def rankVolume(self, volumeNode, prompts, model=None, plane="auto", maxSlices=None, parameterNode=None, timeout=600):
        """Synchronous ranking for scripts: fills the parameter node's outputs and returns the table node."""
        p = parameterNode or self.getParameterNode()
        p.inputVolume = volumeNode
        p.prompts = "\n".join(prompts)
        p.plane, p.maxSlices = plane, maxSlices or 0
        if model is not None:
            p.modelPreset, p.modelFolder = MODEL_LABELS[-1], str(model)
        run = self.startRanking(p)
        event = self.client.wait(run.requestId, timeout=timeout)
        if event["event"] != "result":
            raise RuntimeError(event.get("message") or event["event"])
        self.finishRanking(p, run, event["result"])
        return p.outputTable

    # ---------------------------------------------------------------- display
    def showResults(self, p) -> None:
        """The relevance over the viewers (on the volume it belongs to) and the chart in a plot view.
        The layout changes only when it has no plot view; the user's layout otherwise stays."""
        self.mrmlLogic.showInViewers(self.mrmlLogic.sourceVolume(p.relevanceVolume), p.relevanceVolume)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return
        if layoutManager.plotViewCount == 0:
            layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalPlotView)
        # not Plots' ShowChartInLayout: it switches any layout it does not list to FourUpPlotView
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActivePlotChartID(p.relevanceChart.GetID())
        appLogic.PropagatePlotChartSelection()

    def jumpToSlice(self, p, sliceIndex=None) -> None:
        """Centre the slice viewers on input slice `sliceIndex` (default: where the shown curve peaks)
        of the volume the relevance belongs to: no model and no worker needed."""
        ras = self.mrmlLogic.jumpTarget(p.relevanceVolume, sliceIndex)
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
        real worker process. Uses its own parameter node and temporary folder and removes every node
        it made. Skipped where torch or transformers 5 are absent (e.g. the extension build factory,
        whose Slicer has no torch and where pip installs nothing in testing mode)."""
        import shutil
        import tempfile
        from importlib import metadata

        try:
            have = {name: metadata.version(name) for name in ("torch", "transformers")}
        except metadata.PackageNotFoundError as exc:
            self.delayDisplay(f"RadCLIP model test skipped: {exc.name} is not installed in this Slicer")
            return
        if int(have["transformers"].split(".")[0]) < 5:
            self.delayDisplay(f"RadCLIP model test skipped: transformers {have['transformers']} (needs 5)")
            return
        import numpy as np

        from RadCLIPCore import RadCLIPModel, save_model
        from RadCLIPCore.encoders import bundled_tokenizer, new_clip_model

        self.delayDisplay("Building a tiny model")
        folder = tempfile.mkdtemp(prefix="radclip-selftest-")
        nodesBefore = {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}
        logic = RadCLIPSlicerLogic()
        try:
            tokenizer = bundled_tokenizer()
            save_model(RadCLIPModel(new_clip_model("clip-tiny", tokenizer, seed=0), tokenizer), os.path.join(folder, "tiny"))
            volume = slicer.util.addVolumeFromArray(
                np.random.default_rng(0).normal(size=(20, 48, 40)).astype("float32"), name="synthetic")
            # a parameter node of its own: the panel's settings stay as the user left them
            p = RadCLIPSlicerParameterNode(slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode"))
            table = logic.rankVolume(volume, ["Brain MRI", "Chest CT", "A puppy"], model=os.path.join(folder, "tiny"),
                                     maxSlices=8, parameterNode=p)
            self.assertEqual(table.GetNumberOfRows(), 3)
            self.assertEqual(slicer.util.arrayFromVolume(p.relevanceVolume).size, 20)
            self.assertEqual(p.relevanceVolume.GetAttribute("RadCLIP.sourceVolumeID"), volume.GetID())
        finally:
            logic.stopWorker()
            for i in reversed(range(slicer.mrmlScene.GetNumberOfNodes())):
                node = slicer.mrmlScene.GetNthNode(i)
                if node is not None and node.GetID() not in nodesBefore:
                    slicer.mrmlScene.RemoveNode(node)
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Test passed")

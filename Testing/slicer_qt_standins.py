"""Stand-ins that let the module's real widget run in a real Qt event loop (PySide6) on slicer-core's MRML.

Slicer gives a module PythonQt (`qt`), CTK and qMRML widgets, and a `slicer` package with an application,
ScriptedLoadableModule and parameterNodeWrapper. slicer-core gives only MRML and `slicer.util`. This file
supplies the rest, as small stand-ins named as such:

- `qt`: a thin module re-exporting PySide6's QtCore, QtGui, QtWidgets, with a QUiLoader that knows the
  stand-in widgets below.
- CTK and qMRML widgets the .ui uses (ctkCollapsibleButton, ctkSliderWidget, ctkDirectoryButton,
  qMRMLNodeComboBox backed by the real scene, qMRMLWidget). Their class names must be the .ui's, so that
  QUiLoader builds them.
- `slicer.ScriptedLoadableModule`, `slicer.parameterNodeWrapper` (binding widgets through their
  SlicerParameterName property, as Slicer's does), `slicer.i18n`, `slicer.app`, `slicer.modules`,
  `slicer.mrmlScene`, and the few `slicer.util` GUI helpers that are PythonQt-specific in slicer-core.

PythonQt differences met (the module uses idioms valid in both): PythonQt widgets expose Qt properties
as attributes (`button.enabled = False`, `objectName` as `name`) and connect with signature strings
(`button.connect("clicked(bool)", slot)`); PySide6 does neither, so the module calls setters and
`button.clicked.connect(slot)`.
"""

from __future__ import annotations

import sys
import types
import typing
import unittest
from pathlib import Path

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

import slicer
import slicer.util

# ---------------------------------------------------------------------------------------------------
# qt: PySide6 under PythonQt's module name
# ---------------------------------------------------------------------------------------------------


def make_qt_module() -> types.ModuleType:
    qt = types.ModuleType("qt")
    for source in (QtCore, QtGui, QtWidgets):
        for name in dir(source):
            if name.startswith("Q") or name in ("Qt", "Signal", "Slot"):
                setattr(qt, name, getattr(source, name))
    qt.QUiLoader = StandInUiLoader
    return qt


class StandInUiLoader(QtUiTools.QUiLoader):
    """QUiLoader that builds the stand-in CTK/qMRML widgets for the .ui's custom classes."""

    def __init__(self, parent=None):
        super().__init__(parent)
        for widget_class in STANDIN_WIDGETS:
            self.registerCustomWidget(widget_class)


# ---------------------------------------------------------------------------------------------------
# CTK and qMRML widget stand-ins (class names as in the .ui)
# ---------------------------------------------------------------------------------------------------


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801 (the .ui's class name)
    """Stand-in for CTK's collapsible section: a group box (the .ui sets its title as "text")."""

    def event(self, event):
        if event.type() == QtCore.QEvent.DynamicPropertyChange and bytes(event.propertyName()) == b"text":
            self.setTitle(str(self.property("text")))
        return super().event(event)


class ctkSliderWidget(QtWidgets.QDoubleSpinBox):  # noqa: N801
    """Stand-in for ctkSliderWidget: a double spin box (value, minimum, maximum, singleStep, valueChanged)."""


class ctkDirectoryButton(QtWidgets.QPushButton):  # noqa: N801
    """Stand-in for ctkDirectoryButton: `directory` is an attribute, as PythonQt exposes the Qt property."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._directory = ""

    @property
    def directory(self) -> str:
        return self._directory

    @directory.setter
    def directory(self, value: str) -> None:
        self._directory = str(value)
        self.setText(self._directory)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Stand-in for qMRMLNodeComboBox: lists the real scene's nodes of its nodeTypes (and None when
    noneEnabled), follows the scene's node additions and removals, emits currentNodeChanged(node)."""

    currentNodeChanged = QtCore.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._scene = None
        self._observations = []
        self._nodes = []
        self.currentIndexChanged.connect(self._emitCurrentNode)

    def setMRMLScene(self, scene) -> None:
        for tag in self._observations:
            self._scene.RemoveObserver(tag)
        self._scene, self._observations = scene, []
        if scene is None:
            return
        self._observations = [scene.AddObserver(event, lambda caller, event: self._refresh())
                              for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        tags = list(self._observations)
        # a deleted combo box must not stay observing the scene (the closure holds no reference to it)
        self.destroyed.connect(lambda *args: [scene.RemoveObserver(tag) for tag in tags])
        self._refresh()

    def _nodeTypes(self) -> list:
        return list(self.property("nodeTypes") or [])

    def _refresh(self) -> None:
        current = self.currentNode()
        nodes = [None] if self.property("noneEnabled") else []
        for node_type in self._nodeTypes():
            collection = self._scene.GetNodesByClass(node_type)
            nodes += [collection.GetItemAsObject(i) for i in range(collection.GetNumberOfItems())]
        self._nodes = nodes
        self.blockSignals(True)
        self.clear()
        self.addItems([node.GetName() if node is not None else "None" for node in nodes])
        index = nodes.index(current) if current in nodes else (0 if nodes else -1)
        self.setCurrentIndex(index)
        self.blockSignals(False)
        if self.currentNode() is not current:
            self._emitCurrentNode()

    def currentNode(self):
        index = self.currentIndex()
        return self._nodes[index] if 0 <= index < len(self._nodes) else None

    def setCurrentNode(self, node) -> None:
        if node is not None and node not in self._nodes:
            self._refresh()
        if node in self._nodes:
            self.setCurrentIndex(self._nodes.index(node))

    def _emitCurrentNode(self, *args) -> None:
        self.currentNodeChanged.emit(self.currentNode())


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Stand-in for qMRMLWidget: setMRMLScene hands the scene to its node selectors (the .ui's
    mrmlSceneChanged connections use C++ signatures PySide6 cannot connect)."""

    def setMRMLScene(self, scene) -> None:
        for selector in self.findChildren(qMRMLNodeComboBox):
            selector.setMRMLScene(scene)


STANDIN_WIDGETS = (ctkCollapsibleButton, ctkSliderWidget, ctkDirectoryButton, qMRMLNodeComboBox, qMRMLWidget)


# ---------------------------------------------------------------------------------------------------
# slicer.ScriptedLoadableModule stand-in
# ---------------------------------------------------------------------------------------------------


class ModulePanelStandIn(QtWidgets.QWidget):
    """Stand-in for qSlicerScriptedLoadableModuleWidget: the panel the module's widget fills."""

    def __init__(self):
        super().__init__()
        self.setLayout(QtWidgets.QVBoxLayout())
        self.isEntered = True


def make_scripted_loadable_module() -> types.ModuleType:
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent if parent is not None else ModulePanelStandIn()
            self.layout = self.parent.layout()

        def setup(self):
            pass

        def resourcePath(self, filename):
            return str(Path(sys.modules[type(self).__module__].__file__).parent / "Resources" / filename)

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            scene = slicer.mrmlScene
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node = scene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            DISPLAYED.append(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


DISPLAYED = []  # what the module's self-test displayed (delayDisplay)


# ---------------------------------------------------------------------------------------------------
# slicer.parameterNodeWrapper stand-in: typed fields on a real vtkMRMLScriptedModuleNode, GUI binding
# through each widget's SlicerParameterName property
# ---------------------------------------------------------------------------------------------------


def make_parameter_node_wrapper() -> types.ModuleType:
    module = types.ModuleType("slicer.parameterNodeWrapper")

    def WithinRange(low, high):  # noqa: N802 (Slicer's names)
        return ("range", low, high)

    def Choice(values):  # noqa: N802
        return ("choice", tuple(values))

    def parameterNodeWrapper(cls):  # noqa: N802
        fields = {}
        for name, annotation in typing.get_type_hints(cls, include_extras=True).items():
            base, choices = annotation, None
            if typing.get_origin(annotation) is typing.Annotated:
                base = typing.get_args(annotation)[0]
                for extra in annotation.__metadata__:
                    if isinstance(extra, tuple) and extra[0] == "choice":
                        choices = extra[1]
            fields[name] = (base, getattr(cls, name, None), choices)

        class Wrapper:
            def __init__(self, parameterNode):
                object.__setattr__(self, "parameterNode", parameterNode)
                for name, (base, default, _) in fields.items():
                    if not _is_node_type(base) and parameterNode.GetParameter(name) == "" and default is not None:
                        parameterNode.SetParameter(name, str(default))

            def __getattr__(self, name):
                base, _, _ = fields[name]
                node = self.parameterNode
                if _is_node_type(base):
                    return node.GetNodeReference(name)
                text = node.GetParameter(name)
                if base is bool:
                    return text == "True"
                return base(text) if text != "" else base()

            def __setattr__(self, name, value):
                base, _, _ = fields[name]
                if _is_node_type(base):
                    self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
                else:
                    self.parameterNode.SetParameter(name, str(value))

            def connectGui(self, ui):
                return _connect_gui(self, ui, fields)

            def disconnectGui(self, tag):
                for disconnect in tag or []:
                    disconnect()

        Wrapper.__name__ = cls.__name__
        return Wrapper

    module.WithinRange, module.Choice, module.parameterNodeWrapper = WithinRange, Choice, parameterNodeWrapper
    return module


def _is_node_type(base) -> bool:
    return isinstance(base, type) and base.__name__.startswith("vtkMRML")


def _connect_gui(wrapper, ui, fields) -> list:
    """Bind each widget with a SlicerParameterName to its field both ways; returns the undo functions."""
    bound = [(widget, widget.property("SlicerParameterName")) for widget in vars(ui).values()
             if isinstance(widget, QtWidgets.QWidget) and widget.property("SlicerParameterName")]
    disconnects = []

    def update_widgets(*args):
        for widget, name in bound:
            value = getattr(wrapper, name)
            if isinstance(widget, qMRMLNodeComboBox):
                if widget.currentNode() is not value:
                    widget.setCurrentNode(value)  # emits currentNodeChanged, as the real selector does
            elif isinstance(widget, QtWidgets.QComboBox):
                if widget.currentText() != value:
                    widget.setCurrentText(value)
            elif isinstance(widget, (QtWidgets.QDoubleSpinBox, QtWidgets.QSpinBox)):
                if widget.value() != value:
                    widget.setValue(value)
            elif isinstance(widget, QtWidgets.QCheckBox):
                widget.setChecked(value)
            elif isinstance(widget, QtWidgets.QLineEdit):
                if widget.text() != value:
                    widget.setText(value)

    for widget, name in bound:
        choices = fields[name][2]
        if isinstance(widget, QtWidgets.QComboBox) and not isinstance(widget, qMRMLNodeComboBox) and choices:
            widget.clear()
            widget.addItems(list(choices))
        signal = (widget.currentNodeChanged if isinstance(widget, qMRMLNodeComboBox)
                  else widget.currentTextChanged if isinstance(widget, QtWidgets.QComboBox)
                  else widget.valueChanged if isinstance(widget, (QtWidgets.QDoubleSpinBox, QtWidgets.QSpinBox))
                  else widget.toggled if isinstance(widget, QtWidgets.QCheckBox)
                  else widget.textChanged)

        def to_parameter(value, name=name):
            if getattr(wrapper, name) != value:
                setattr(wrapper, name, value)

        signal.connect(to_parameter)
        disconnects.append(lambda signal=signal, slot=to_parameter: signal.disconnect(slot))
    import vtk

    tags = [wrapper.parameterNode.AddObserver(event, update_widgets)
            for event in (vtk.vtkCommand.ModifiedEvent, slicer.vtkMRMLNode.ReferenceAddedEvent,
                          slicer.vtkMRMLNode.ReferenceModifiedEvent, slicer.vtkMRMLNode.ReferenceRemovedEvent)]
    disconnects += [lambda tag=tag: wrapper.parameterNode.RemoveObserver(tag) for tag in tags]
    update_widgets()
    return disconnects


# ---------------------------------------------------------------------------------------------------
# slicer.app, slicer.modules, slicer.i18n and the PythonQt-specific slicer.util GUI helpers
# ---------------------------------------------------------------------------------------------------


class ApplicationStandIn(QtCore.QObject):
    """Stand-in for slicer.app: the parts the module and slicer.util use."""

    startupCompleted = QtCore.Signal()

    def __init__(self, mrml, temporary_path: Path):
        super().__init__()
        self._mrml = mrml
        self.temporaryPath = str(temporary_path)
        self.applicationName = "Slicer (test harness)"

    def applicationLogic(self):
        return self._mrml.application_logic

    def startupEnvironment(self):
        return QtCore.QProcessEnvironment.systemEnvironment()

    def testingEnabled(self) -> bool:
        return True  # slicer.util shows no modal dialog in testing mode: it logs instead

    def setOverrideCursor(self, cursor):
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self):
        QtWidgets.QApplication.restoreOverrideCursor()

    def processEvents(self):
        QtWidgets.QApplication.processEvents()


class GuiRecord:
    """What the module asked of Slicer's GUI that this harness has no view for."""

    def __init__(self):
        self.slice_layers = []
        self.errors = []
        self.questions = []  # yes/no questions the module asked; each is answered with `answer`
        self.answer = True

    def ask(self, text, **kwargs) -> bool:
        self.questions.append(text)
        return self.answer


def install(mrml, main_window: QtWidgets.QMainWindow, temporary_path: Path) -> tuple:
    """Put the stand-ins in place (sys.modules and attributes of the real `slicer` package).

    Returns (undo function, GuiRecord).
    """
    record = GuiRecord()
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    modules = {"qt": make_qt_module(), "slicer.i18n": i18n,
               "slicer.ScriptedLoadableModule": make_scripted_loadable_module(),
               "slicer.parameterNodeWrapper": make_parameter_node_wrapper()}
    attributes = {
        (slicer, "mrmlScene"): mrml.scene,
        (slicer, "app"): ApplicationStandIn(mrml, temporary_path),
        (slicer, "modules"): types.SimpleNamespace(
            markups=types.SimpleNamespace(logic=lambda: mrml.markups_logic),
            volumes=types.SimpleNamespace(logic=lambda: mrml.volumes_logic)),
        (slicer.util, "mainWindow"): lambda: main_window,
        (slicer.util, "childWidgetVariables"): _child_widget_variables,
        (slicer.util, "setSliceViewerLayers"): lambda **layers: record.slice_layers.append(layers),
        (slicer.util, "errorDisplay"): lambda text, **kwargs: record.errors.append(text),
        (slicer.util, "confirmOkCancelDisplay"): lambda text, **kwargs: True,
        (slicer.util, "confirmYesNoDisplay"): record.ask,
    }
    saved_modules = {name: sys.modules.get(name) for name in modules}
    saved_attributes = {key: getattr(*key, None) for key in attributes}
    sys.modules.update(modules)
    for (owner, name), value in attributes.items():
        setattr(owner, name, value)

    def undo():
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for (owner, name), value in saved_attributes.items():
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)

    return undo, record


def _child_widget_variables(widget):
    """slicer.util.childWidgetVariables with objectName(): PySide6 has no PythonQt `name` attribute."""
    ui = types.SimpleNamespace()
    for child in widget.findChildren(QtWidgets.QWidget):
        if child.objectName():
            setattr(ui, child.objectName(), child)
    return ui

"""RadCLIPCore stays free of Slicer/Qt/VTK, and its wheel carries the bundled tokenizer and configs."""
import ast
import subprocess
import sys
import zipfile

from conftest import REPO

FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "PythonQt", "mrml"}


def test_radclipcore_never_imports_slicer_qt_or_vtk():
    offenders = []
    for path in (REPO / "RadCLIPCore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN or n.startswith("vtk")]
    assert offenders == []


def test_wheel_contains_the_bundled_resources(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("RadCLIPCore/resources/tokenizer/vocab.json", "RadCLIPCore/resources/tokenizer/merges.txt",
                   "RadCLIPCore/resources/configs/clip-vit-large-patch14.json", "RadCLIPCore/resources/NOTICE.md",
                   "RadCLIPCore/resources/lexicons/totalsegmentator_total.json", "RadCLIPCore/__main__.py"):
        assert needed in names, needed
    assert not any(n.startswith(("Testing/", "benchmarks/", "tools/")) for n in names)


# ---------------------------------------------------------------- the Slicer module, statically
MODULE = REPO / "RadCLIPSlicer"


def _parameter_fields():
    tree = ast.parse((MODULE / "RadCLIPSlicer.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper"
                                                  for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class in RadCLIPSlicer.py")


def _module_constant(name):
    tree = ast.parse((MODULE / "RadCLIPSlicer.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    raise AssertionError(f"no {name} in RadCLIPSlicer.py")


def test_ui_binds_exactly_the_parameter_node_fields_it_should():
    """Every field is bound through SlicerParameterName except those the module syncs itself (the
    prompt box: Slicer's QTextEdit connector moves the cursor on every keystroke), and no QTextEdit
    is bound at all."""
    import xml.etree.ElementTree as ET

    root = ET.parse(MODULE / "Resources" / "UI" / "RadCLIPSlicer.ui").getroot()
    bound = [p.find("string").text for p in root.iter("property") if p.get("name") == "SlicerParameterName"]
    assert len(bound) == len(set(bound)), "a parameter is bound twice"
    unbound = set(_module_constant("UNBOUND_PARAMETERS"))
    assert set(bound) == _parameter_fields() - unbound and unbound <= _parameter_fields()
    for widget in root.iter("widget"):
        names = [p.find("string").text for p in widget.findall("property") if p.get("name") == "SlicerParameterName"]
        assert not (names and widget.get("class") in ("QTextEdit", "QPlainTextEdit")), widget.get("name")
    selectors = {w.get("name"): w for w in root.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    volume = selectors["inputVolumeSelector"]
    assert any(p.get("name") == "showChildNodeTypes" and p.find("bool").text == "false" for p in volume)
    assert set(selectors) == {"inputVolumeSelector", "inputSegmentationSelector"}  # no output node pickers


def _cmake_list(text, name):
    import re

    match = re.search(rf"set\({name}\s*\n(.*?)\)", text, re.S)
    assert match, name
    return [line.strip().replace("${MODULE_NAME}", "RadCLIPSlicer") for line in match.group(1).splitlines()
            if line.strip()]


def test_cmake_lists_every_module_file_and_nothing_else():
    text = (MODULE / "CMakeLists.txt").read_text()
    listed = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS") + _cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    present = {str(p.relative_to(MODULE)) for p in MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    assert listed == present
    core = REPO / "RadCLIPCore"
    bundled = set(_cmake_list(text, "RADCLIPCORE_FILES"))
    assert bundled == {str(p.relative_to(core)) for p in core.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def test_module_imports_no_heavy_dependency_at_import_time():
    """torch and the rest are installed on first use, never when Slicer loads the module (which reads
    only the torch-free table of model presets)."""
    tree = ast.parse((MODULE / "RadCLIPSlicer.py").read_text(encoding="utf-8"))
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    modules = {n.module or "" for n in top if isinstance(n, ast.ImportFrom)}
    names |= {m.split(".")[0] for m in modules if m != "RadCLIPCore.presets"}  # a torch-free table
    assert not names & {"torch", "transformers", "RadCLIPCore", "RadCLIPSlicerLib", "numpy", "SimpleITK"}


def test_slicer_process_never_imports_torch():
    """Slicer's GUI process loads the module's helpers (MRML logic, worker client) and the presets,
    never torch or transformers: those live in the worker process."""
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import RadCLIPSlicerLib, RadCLIPSlicerLib.client, RadCLIPSlicerLib.logic, RadCLIPSlicerLib.dependencies\n"
            "import RadCLIPCore.presets, RadCLIPCore.protocol\n"
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
            "assert not heavy, heavy")
    res = subprocess.run([sys.executable, "-c", code, str(REPO), str(MODULE)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr


def test_extension_builds_the_module_and_has_its_icon():
    """The catalog metadata (.json, .s4ext, CMake) is checked in test_catalog.py."""
    assert "add_subdirectory(RadCLIPSlicer)" in (REPO / "CMakeLists.txt").read_text()
    from PIL import Image

    assert Image.open(MODULE / "Resources" / "Icons" / "RadCLIPSlicer.png").size == (128, 128)


def test_module_requirements_are_valid_and_match_the_package():
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    import tomllib

    deps = {Requirement(d).name.lower(): Requirement(d) for d in
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    for r in reqs:
        assert r.name.lower() in deps and str(r.specifier) == str(deps[r.name.lower()].specifier), r
    assert "torch" not in {r.name for r in reqs}  # through light-the-torch, with the right CUDA build


def test_a_remote_worker_needs_nothing_installed_in_slicer(tmp_path):
    """The dependency check looks at the worker command first: with a remote worker Slicer needs only
    what the client needs; a local worker needs torch and the requirements, read from package
    metadata (torch is never imported)."""
    sys.path.insert(0, str(MODULE))
    from RadCLIPSlicerLib.dependencies import missingForWorker

    reqs = tmp_path / "requirements.txt"
    reqs.write_text("# comment\nnumpy>=1.0\nno-such-package-radclip>=1.0\n")
    assert missingForWorker(reqs, "ssh gpu-box /opt/venv/bin/python -m RadCLIPCore serve") == {"torch": [], "packages": []}
    local = missingForWorker(reqs, "")
    assert local == {"torch": [], "packages": ["no-such-package-radclip>=1.0"]}  # torch 2.13 is installed here
    # from package metadata only: test_slicer_process_never_imports_torch imports this module in a clean process

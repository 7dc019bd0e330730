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
                   "RadCLIPCore/__main__.py"):
        assert needed in names, needed
    assert not any(n.startswith(("Testing/", "benchmarks/", "tools/")) for n in names)

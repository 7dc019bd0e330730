"""The Slicer Extensions Index's checks, offline.

Slicer/ExtensionsIndex `scripts/check_description_files.py` (read at commit 07f1d1b, 2026-08) validates a
catalog entry `<ExtensionName>.json` (it ignores every other file, `.s4ext` included) and a shallow clone of
its `scm_url`. Each test below mirrors one function of that script, on our `RadCLIPSlicer.json` and on the
working tree's tracked files (what a clone would hold). Not mirrored, because they need the network:
`check_clone_repository` (git clone of scm_url) and `check_git_repository_topics` (GitHub API: the repository
must carry the topic `3d-slicer-extension`: set it on GitHub when the repository is created);
`check_json_schema` and `validate_image_url` download, so their offline halves are tested here against the
schema's rules and the files the URLs name.

CI has no network and we commit no copy of the script: set EXTENSIONS_INDEX_CHECK_SCRIPT to a local copy
(Python >= 3.12, or EXTENSIONS_INDEX_PYTHON naming such an interpreter) to run the real script as well.
The `.s4ext` and the top-level CMakeLists.txt must agree with each other and with the module's contributors.
"""
import ast
import json
import os
import re
import subprocess
import sys
import urllib.parse as urlparse
from pathlib import Path

import pytest

from conftest import REPO

NAME = "RadCLIPSlicer"
ENTRY_PATH = REPO / f"{NAME}.json"
ENTRY = json.loads(ENTRY_PATH.read_text(encoding="utf-8"))
CMAKE = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
S4EXT = dict(line.split(" ", 1) for line in (REPO / f"{NAME}.s4ext").read_text(encoding="utf-8").splitlines()
             if line.strip() and not line.startswith("#") and " " in line)

# One repository for every URL of the description (its name must start with "Slicer").
REPOSITORY = "https://github.com/RadCLIPSlicer/SlicerRadCLIP"
RAW = "https://raw.githubusercontent.com/RadCLIPSlicer/SlicerRadCLIP/main/"


def _cmake_set(variable):
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', CMAKE)
    assert match, f"{variable} missing from the top-level CMakeLists.txt"
    return match.group(1)


def _tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / p for p in out.decode().split("\0") if p and (REPO / p).is_file()]


def _image_at(url):
    """validate_image_url without the download: the URL names a tracked PNG/JPEG/GIF of this repository on
    the branch the catalog builds."""
    assert url.startswith(RAW), f"{url} is not a file of {REPOSITORY} on {ENTRY['scm_revision']}"
    path = REPO / urlparse.unquote(url[len(RAW):])
    assert path in _tracked_files(), f"{url}: {path} is not a tracked file"
    head = path.read_bytes()[:8]
    assert head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF8")), f"{url} is not a PNG/JPEG/GIF"
    return path


def test_check_json_file_format():
    """check_json_file_format: valid JSON, LF-only line endings."""
    raw = ENTRY_PATH.read_bytes()
    json.loads(raw)
    assert b"\r" not in raw


def test_check_json_schema_offline():
    """check_json_schema (downloads the schema named by `$schema`): the rules of Slicer's
    Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: required keys, no others, their types."""
    assert re.fullmatch(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                        r"slicer-extension-catalog-entry-schema-v1\.0\.[0-9]+\.json#?", ENTRY["$schema"])
    assert {"$schema", "category", "scm_url"} <= set(ENTRY)
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "build_subdirectory", "enabled", "tier"}
    assert set(ENTRY) <= allowed, set(ENTRY) - allowed
    for key in ("$schema", "category", "scm_url", "scm_revision", "build_subdirectory"):
        assert isinstance(ENTRY.get(key, ""), str), key
    assert all(isinstance(d, str) for d in ENTRY.get("build_dependencies", []))
    assert isinstance(ENTRY.get("tier", 1), int) and 1 <= ENTRY.get("tier", 1) <= 5


def test_check_extension_name():
    """check_extension_name: the extension (the .json's file name) must not start with 'Slicer'."""
    assert not ENTRY_PATH.stem.lower().startswith("slicer")


def test_check_category():
    """check_category: one of the script's ACCEPTED_EXTENSION_CATEGORIES ('Informatics' is one)."""
    assert ENTRY["category"] == S4EXT["category"] == _cmake_set("EXTENSION_CATEGORY") == "Informatics"


def _repository_name(url):
    # check_git_repository_name's own parsing of scm_url
    return os.path.splitext(urlparse.urlsplit(url.strip().strip("/")).path.split("/")[-1])[0]


def test_check_git_repository_name():
    """check_git_repository_name: the repository's name starts with Slicer (or Slicer-, Slicer_,
    SlicerExtension-, SlicerExtension_); every URL of the description names that one repository."""
    for url in (ENTRY["scm_url"], S4EXT["scmurl"], S4EXT["homepage"], _cmake_set("EXTENSION_HOMEPAGE")):
        assert _repository_name(url).startswith("Slicer"), url
        assert url.removesuffix(".git") == REPOSITORY, url
    urls = [S4EXT["iconurl"], _cmake_set("EXTENSION_ICONURL"), *S4EXT["screenshoturls"].split(),
            *_cmake_set("EXTENSION_SCREENSHOTURLS").split()]
    assert all(u.startswith(RAW) for u in urls), urls


def test_check_scm_url_syntax():
    """check_scm_url_syntax: scheme://host/path with scheme git or https."""
    assert "://" in ENTRY["scm_url"] and urlparse.urlsplit(ENTRY["scm_url"]).scheme in ("git", "https")


def test_check_cmakelists_content():
    """check_cmakelists_content, with the script's own patterns: the first project() is the extension name;
    EXTENSION_ICONURL and EXTENSION_SCREENSHOTURLS are set, on one line each, to images (validate_image_url)."""
    assert re.findall(r'project\s*\(\s*([^\s\)\n\r]+)', CMAKE, re.IGNORECASE)[0].strip("\"'") == ENTRY_PATH.stem
    icons = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', CMAKE, re.IGNORECASE)
    assert icons and icons[0].strip().startswith("http")
    _image_at(icons[0].strip())
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', CMAKE, re.IGNORECASE)
    assert shots and len(shots[0].split()) >= 2
    for url in shots[0].split():
        _image_at(url)


def test_check_license_file():
    """check_license_file: LICENSE (or LICENCE, COPYING, ...) at the root of the clone, i.e. tracked."""
    assert REPO / "LICENSE" in _tracked_files()
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text


def test_check_repository_size():
    """check_repository_size: the clone (checkout plus its .git) stays under 100 MB; the tracked files
    under 50 MB leaves room for the pack."""
    total = sum(p.stat().st_size for p in _tracked_files())
    assert total < 50 * 1024 * 1024, f"{total / 2**20:.1f} MB tracked"


def test_check_dependencies():
    """check_dependencies: every build dependency is an extension of the index (PyTorch.json is)."""
    assert ENTRY["build_dependencies"] == S4EXT["depends"].split() == _cmake_set("EXTENSION_DEPENDS").split() \
        == ["PyTorch"]


# ---------------------------------------------------------------- .s4ext, CMake and module agree
def test_s4ext_agrees_with_cmake():
    assert S4EXT["scmurl"] == ENTRY["scm_url"] and S4EXT["scmrevision"] == ENTRY["scm_revision"]
    assert S4EXT["build_subdirectory"] == ENTRY["build_subdirectory"] == "."
    assert re.search(r"set\(EXTENSION_BUILD_SUBDIRECTORY \.\)", CMAKE)
    for key, variable in (("homepage", "EXTENSION_HOMEPAGE"), ("contributors", "EXTENSION_CONTRIBUTORS"),
                          ("description", "EXTENSION_DESCRIPTION"), ("iconurl", "EXTENSION_ICONURL")):
        assert S4EXT[key].strip() == _cmake_set(variable), key
    assert S4EXT["screenshoturls"].split() == _cmake_set("EXTENSION_SCREENSHOTURLS").split()


def _contributors(text):
    """'Name (Org), Name (SubOrg, Org)' -> [(name, org), ...]"""
    entries = re.findall(r"\s*([^(),]+?)\s*\(([^()]+)\)\s*(?:,|$)", text)
    squeeze = lambda s: re.sub(r"[\s,]", "", s)  # noqa: E731
    assert squeeze("".join(f"{n}({o})" for n, o in entries)) == squeeze(text), \
        f"not 'Name (Organisation), ...': {text!r}"
    return entries


def test_contributors_are_name_organisation_and_no_placeholder():
    contributors = _cmake_set("EXTENSION_CONTRIBUTORS")
    entries = _contributors(contributors)
    assert entries
    placeholders = ("maintainer", "firstname", "lastname", "jane roe", "john doe", "joe bloggs", "superware",
                    "noware", "todo", "tbd", "your name")
    assert not any(p in contributors.lower() for p in placeholders), contributors


def test_module_contributors_match_the_extension():
    tree = ast.parse((REPO / NAME / f"{NAME}.py").read_text(encoding="utf-8"))
    values = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(ast.unparse(t) == "self.parent.contributors" for t in node.targets)]
    assert len(values) == 1
    assert ", ".join(ast.literal_eval(values[0])) == _cmake_set("EXTENSION_CONTRIBUTORS")


# ---------------------------------------------------------------- the real script, when a copy is at hand
RUNNER = r'''
import importlib.util, json, os, shutil, subprocess, sys
script, repo, workdir, schema = sys.argv[1:5]
spec = importlib.util.spec_from_file_location("check_description_files", script)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
entry = json.load(open(os.path.join(repo, "RadCLIPSlicer.json")))
repository = entry["scm_url"].removesuffix(".git")
raw = repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/" + entry["scm_revision"] + "/"

def clone(extension_name, metadata, cloned_repository_folder):
    """The tracked files of the working tree stand for the clone."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src = os.path.join(repo, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(cloned_repository_folder, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(cloned_repository_folder, rel))
    print("- offline: tracked files copied in place of git clone")

def validate_image_url(url, url_type, extension_name, check_name):
    if not url.startswith(raw):
        raise m.ExtensionCheckError(extension_name, check_name, f"{url_type} {url} is not under {raw}")
    path = os.path.join(repo, url[len(raw):])
    if not os.path.isfile(path) or open(path, "rb").read(4) not in (b"\x89PNG", b"GIF8") and \
            open(path, "rb").read(3) != b"\xff\xd8\xff":
        raise m.ExtensionCheckError(extension_name, check_name, f"{url_type} {url}: no image at {path}")

def topics(extension_name, metadata):
    return "- offline: GitHub topics not checked (needs the GitHub API)"

class Response:
    def __init__(self, text): self.text = text
    def raise_for_status(self): pass
    def json(self): return json.loads(self.text)

m.check_clone_repository = clone
m.validate_image_url = validate_image_url
m.check_git_repository_topics = topics
if schema:
    m.requests.get = lambda url, **kw: Response(open(schema, encoding="utf-8").read())
else:
    m.check_json_schema = lambda *a, **k: "- offline: schema not checked (no local schema)"
index = os.path.dirname(os.path.dirname(os.path.abspath(script)))
for dependency in entry.get("build_dependencies", []):
    if os.path.isfile(os.path.join(index, dependency + ".json")):
        shutil.copy(os.path.join(index, dependency + ".json"), workdir)
    else:
        m.check_dependencies = lambda folder: print("- offline: no index checkout beside the script")
shutil.copy(os.path.join(repo, "RadCLIPSlicer.json"), workdir)
os.chdir(workdir)
sys.argv = ["check_description_files.py", "RadCLIPSlicer.json"]
sys.exit(m.main())
'''


def test_real_check_script(tmp_path):
    """The real check_description_files.py with its network replaced: clone -> tracked files, image URLs ->
    those files, topics skipped, the schema from SLICER_EXTENSION_SCHEMA (a local copy) if set."""
    script = os.environ.get("EXTENSIONS_INDEX_CHECK_SCRIPT")
    if not script or not Path(script).is_file():
        pytest.skip("EXTENSIONS_INDEX_CHECK_SCRIPT does not name a copy of check_description_files.py")
    python = os.environ.get("EXTENSIONS_INDEX_PYTHON", sys.executable)
    compiled = subprocess.run([python, "-c", "import sys; compile(open(sys.argv[1]).read(), 'x', 'exec')", script],
                              capture_output=True, text=True)
    if compiled.returncode:
        pytest.skip(f"{python} cannot compile the script (it needs Python >= 3.12): set EXTENSIONS_INDEX_PYTHON")
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "index").mkdir()
    run = subprocess.run([python, str(tmp_path / "runner.py"), script, str(REPO), str(tmp_path / "index"),
                          os.environ.get("SLICER_EXTENSION_SCHEMA", "")],
                         capture_output=True, text=True, timeout=300)
    report = run.stdout + run.stderr
    assert run.returncode == 0 and ":x:" not in report, report
    assert report.count(":white_check_mark:") >= 11, report

"""What the project installs: one import root, `biencoder`, shared with no other distribution.

The repository root is the package (pyproject's ``package-dir``) and its folders are namespace
packages, so that a checkout on ``sys.path`` (``python train.py``, ``python -c`` from the root,
``PYTHONPATH``) cannot hide an installed package whose name one of its folders shares:
Hugging Face's ``kernels``, which transformers imports, is the case that broke the suite.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
ROOT = "biencoder"
# What the wheel holds besides Python modules: the configs, the bundled data and prompts.
PACKAGED_FOLDERS = (
    "conf",
    "data",
    "evaluation",
    "kernels",
    "losses",
    "model",
    "retrieval",
    "runtime",
    "training",
)
ENTRY_POINTS = ("train", "eval", "mine", "synthesize", "compare")
NOT_PACKAGED = {".git", ".ci", ".venv", "bench", "build", "outputs", "multirun", "tests", "wandb"}
IMPORTS = (
    "import transformers.models.bert.modeling_bert, transformers.models.llama.modeling_llama\n"
    "import biencoder.kernels.infonce as k\n"
    "print(k.__file__)\n"
)


def _source_files() -> list[Path]:
    """The repository's files that belong in the wheel, relative to the root."""
    files = [Path(f"{name}.py") for name in ENTRY_POINTS]
    for folder in PACKAGED_FOLDERS:
        for path in sorted((REPO_ROOT / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                files.append(path.relative_to(REPO_ROOT))
    return files


def _pip(*args: str) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "pip", *args, "-q"], capture_output=True, text=True
    )
    assert process.returncode == 0, process.stderr[-3000:]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of the tree (so nothing is left in it)."""
    source = tmp_path_factory.mktemp("source") / "checkout"
    shutil.copytree(
        REPO_ROOT,
        source,
        ignore=shutil.ignore_patterns(*NOT_PACKAGED, "__pycache__", "*.egg-info", ".*cache"),
    )
    out = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(source))
    (built,) = out.glob("biencoder-*.whl")
    return built


def _top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = {name.split("/")[0] for name in archive.namelist()}
    return {name.removesuffix(".py") for name in names if not name.endswith(".dist-info")}


def test_the_wheel_installs_one_root_that_no_other_distribution_provides(wheel):
    assert _top_level_names(wheel) == {ROOT}
    providers = importlib.metadata.packages_distributions().get(ROOT, [])
    assert {name.lower() for name in providers} <= {ROOT}, providers


def test_the_wheel_holds_every_module_config_and_data_file_under_the_root(wheel):
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if not name.split("/")[0].endswith("info")}
    expected = {f"{ROOT}/{path.as_posix()}" for path in _source_files()}
    assert expected - packaged == set(), "missing from the wheel (pyproject's packages list?)"
    assert {name for name in packaged if name.startswith(f"{ROOT}/tests/")} == set()
    assert f"{ROOT}/conf/train.yaml" in packaged
    assert f"{ROOT}/kernels/infonce.py" in packaged


def test_no_folder_of_the_checkout_can_hide_an_installed_package():
    """A regular package (a folder with __init__.py) or a module at the root would win over
    site-packages whenever the root is on sys.path; namespace folders never do."""
    inits = [
        path.relative_to(REPO_ROOT)
        for path in REPO_ROOT.rglob("__init__.py")
        if not {".git", ".venv", "build", "outputs"} & set(path.relative_to(REPO_ROOT).parts)
    ]
    assert inits == [], "an __init__.py makes its folder shadow installed packages of that name"
    installed = set(importlib.metadata.packages_distributions())
    root_modules = {path.stem for path in REPO_ROOT.glob("*.py")}
    assert root_modules & installed == set(), "a module at the root shares an installed name"


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_transformers_and_the_kernels_import_from_anywhere(where, tmp_path):
    """transformers imports Hugging Face's `kernels` when it is installed; ours must not be it."""
    cwd = REPO_ROOT if where == "repository root" else tmp_path
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    for path in ("", str(REPO_ROOT)):  # as `python -c` runs, and with the checkout on PYTHONPATH
        env["PYTHONPATH"] = path
        process = subprocess.run(
            [sys.executable, "-c", IMPORTS], cwd=cwd, env=env, capture_output=True, text=True
        )
        assert process.returncode == 0, process.stderr[-3000:]
        assert Path(process.stdout.strip()).name == "infonce.py"


def test_the_installed_wheel_composes_its_configs_from_another_folder(wheel, tmp_path):
    """The wheel's entry points find their Hydra configs inside the package, not the checkout."""
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel))
    env = {**os.environ, "PYTHONPATH": str(site), "TRITON_INTERPRET": "1"}
    process = subprocess.run(
        [
            sys.executable,
            "-c",
            "import biencoder.train, sys; print(biencoder.train.__file__, file=sys.stderr); "
            "sys.argv = ['biencoder-train', '--cfg', 'job', 'debug=tiny', 'loss=triplet']; "
            "biencoder.train.main()",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert str(site) in process.stderr, "imported the checkout, not the installed wheel"
    assert "_target_: biencoder.training." in process.stdout
    assert "max_steps: 2" in process.stdout

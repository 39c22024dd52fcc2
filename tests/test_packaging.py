"""The install: the card's folders land under one name, `kinject`, and nothing else of ours does."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib

from conftest import REPO

# Names a generic top-level package of ours would take from the environment.
GENERIC = ["core", "eval", "service", "ui", "ingest", "augment", "finetune", "recipes"]


def _package_dirs() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def test_a_wheel_install_holds_only_the_kinject_package_with_every_subpackage(tmp_path):
    # Built from a clean copy: setuptools reuses a build/ folder, which could hold stale modules.
    source, target = tmp_path / "source", tmp_path / "site"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for folder in set(_package_dirs().values()):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-compile", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    top = {p.name for p in target.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"kinject"}, top
    # Every package folder of the source tree is in the wheel, so a subpackage missing from
    # pyproject's `packages` list fails here rather than at a user's import.
    for name, folder in _package_dirs().items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            installed = target.joinpath(*name.split("."), rel, "__init__.py")
            assert installed.exists(), f"{init.parent} is not installed (add it to [tool.setuptools] packages)"


def test_generic_names_find_nothing_of_ours_outside_the_repo(tmp_path):
    """Outside the repository, `import eval` or `import core` must not find our folders."""
    probe = "; ".join(
        [
            "import importlib.util, kinject.cli, kinject.core.settings",
            f"found = [n for n in {GENERIC!r} if importlib.util.find_spec(n) is not None]",
            "print(','.join(found) or 'none')",
        ]
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none"

"""What users install is what is tested: the wheel built from this tree, installed (no -e) into a
fresh virtual environment outside the repository, runs every backend from another directory
(tests/use_installed.py), and carries every module, the C++/CUDA sources and the license.

Marked `install`: `-m "not install"` deselects it. It needs pip to reach an index (for the build
backend, setuptools, and a current pip). Half a minute when torch's extension cache already holds a
build of the same C++ sources (its key is a digest of the installed sources, so the wheel's copy
loads it), as after tests/test_csrc.py; about two minutes when the installed sources are built.

The fresh environment does not download torch and Triton again: its site-packages has a .pth line
naming a folder of links to every entry of this test's own site-packages except the traces of
peer_kernels there (an editable install's finder, its .pth files, its dist-info; no .pth file is
linked, so none of them runs). So `import peer_kernels` can only find the wheel, pip resolves the
wheel's requirements against what the links provide, and use_installed.py checks where every
module came from. The fresh environment's bin/ comes first on the PATH, before the caller's (where
torch's C++ build finds ninja, as a user's shell would).
"""
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

import peer_kernels

pytestmark = pytest.mark.install

REPO = Path(__file__).resolve().parent.parent
# traces of a peer_kernels install in the test's own environment, which the fresh one must not see
NOT_LINKED = re.compile(r"(peer_kernels|peer-kernels|__editable__).*|.*\.(pth|egg-link)", re.IGNORECASE)


def _run(*command, cwd, env=None):
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source_files():
    """The files of this checkout as a fresh clone has them (tracked or not ignored, and present)."""
    listed = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO)
    return [name for name in listed.split("\0") if name and (REPO / name).is_file()]


def _link_entries(source, into):
    into.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if not NOT_LINKED.fullmatch(entry.name) and not (into / entry.name).exists():
            (into / entry.name).symlink_to(entry)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, the fresh environment's python, its site-packages, the source copy the wheel came from)."""
    root = tmp_path_factory.mktemp("install")
    # a copy of the tree, so a stale build/ or egg-info of the checkout cannot leak into the wheel
    source = root / "source"
    for name in _source_files():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", root / "dist", source, cwd=root)
    wheel, = (root / "dist").glob("peer_kernels-*.whl")

    env = root / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    site_packages = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                              cwd=root).strip())
    # pip < 25 prints no License-Expression (PEP 639) in `pip show`; users are told to upgrade
    _run(python, "-m", "pip", "install", "-q", "--upgrade", "pip", cwd=root)
    for key in ("purelib", "platlib"):
        _link_entries(Path(sysconfig.get_paths()[key]), root / "dependencies")
    (site_packages / "dependencies.pth").write_text(f"{root / 'dependencies'}\n")
    _run(python, "-m", "pip", "install", "-q", wheel, cwd=root)
    return wheel, python, site_packages, source


def test_wheel_ships_every_module_the_csrc_sources_and_the_license(installed):
    wheel, _, _, source = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        modules = {p.relative_to(source).as_posix() for p in (source / "peer_kernels").rglob("*.py")}
        assert modules and not modules - names, f"not in the wheel: {sorted(modules - names)}"
        csrc = {"peer_kernels/csrc_reference/" + p.name for p in (source / "csrc_reference").iterdir()}
        assert {"peer_kernels/csrc_reference/peer_cpu.cpp", "peer_kernels/csrc_reference/peer_cuda.cu"} <= csrc
        assert not csrc - names, f"not in the wheel: {sorted(csrc - names)}"
        dist_info = f"peer_kernels-{peer_kernels.__version__}.dist-info"
        assert f"{dist_info}/licenses/LICENSE" in names, sorted(n for n in names if n.startswith(dist_info))
        assert archive.read(f"{dist_info}/licenses/LICENSE") == (source / "LICENSE").read_bytes()
        metadata = archive.read(f"{dist_info}/METADATA").decode()
    assert f"\nVersion: {peer_kernels.__version__}\n" in metadata
    assert "\nLicense-Expression: MIT\n" in metadata


def test_pip_show_names_the_version_license_and_urls(installed):
    _, python, site_packages, _ = installed
    shown = _run(python, "-m", "pip", "show", "peer_kernels", cwd=python.parent)
    assert f"\nVersion: {peer_kernels.__version__}\n" in shown
    assert "\nLicense-Expression: MIT\n" in shown
    assert "\nHome-page: https://github.com/peer-kernels/peer_kernels\n" in shown
    assert f"\nLocation: {site_packages}\n" in shown


def test_the_installed_wheel_runs_every_backend_from_another_directory(installed, tmp_path):
    _, python, site_packages, _ = installed
    script = tmp_path / "use_installed.py"
    shutil.copy(Path(__file__).with_name("use_installed.py"), script)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PATH=os.pathsep.join([str(python.parent), os.environ.get("PATH", "")]),
               VIRTUAL_ENV=str(python.parent.parent), PYTHONNOUSERSITE="1", TRITON_INTERPRET="1")
    shown = _run(python, script, site_packages, cwd=tmp_path, env=env)
    assert "triton: ran" in shown and "cpp: ran" in shown and "optim: ran" in shown, shown

"""The package as users install it: one import name, import contracts, coexistence with proto-plus.

A non-editable install is built once (from a copy of the working tree, so no stale build/ folder can
leak into it) into a temporary ``--target`` folder; the checks run against that copy, where the
mapped folders (sender/, receiver/, channel/, experiments/, proto/miscnet/v1) sit beneath ``miscnet``
exactly as they will in site-packages.
"""

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to copy the tree from")
    src = tmp_path_factory.mktemp("src")
    for f in _tracked_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-compile", "--target", str(target), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def _run(target: Path, args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, **kw)


def test_install_adds_only_the_miscnet_import_name(installed):
    top = {p.name for p in installed.iterdir()} - {"bin"}
    assert {n for n in top if not n.endswith(".dist-info")} == {"miscnet"}
    for folder in ("sender", "receiver", "channel", "experiments", "v1", "core", "cli"):
        assert (installed / "miscnet" / folder / "__init__.py").is_file(), folder
    assert (installed / "miscnet" / "v1" / "bitstream.proto").is_file()  # the schema ships with its code


# Where each source folder lands beneath miscnet (pyproject.toml's package-dir).
MAPPED = {"src/miscnet": "", "sender": "sender", "receiver": "receiver", "channel": "channel",
          "experiments": "experiments", "proto/miscnet/v1": "v1"}
DATA_SUFFIXES = (".json", ".toml", ".txt", ".proto")


def test_install_holds_every_module_and_data_file(installed):
    """A package or data file missing from pyproject's lists would vanish from a real install."""
    missing = []
    for src, dest in MAPPED.items():
        for f in (ROOT / src).rglob("*"):
            rel = f.relative_to(ROOT / src)
            if f.suffix in (".py", *DATA_SUFFIXES) and "__pycache__" not in rel.parts and f.name != "generate.py":
                if not (installed / "miscnet" / dest / rel).is_file():
                    missing.append(f"{src}/{rel}")
    assert not missing, f"not installed: {missing}"


def test_import_contracts_hold(installed):
    lint = shutil.which("lint-imports", path=str(BIN))
    if lint is None:
        pytest.skip("import-linter is not installed (make test installs it)")
    proc = _run(installed, [lint, str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_miscnet_and_proto_plus_share_an_environment(installed, tmp_path):
    pytest.importorskip("proto", reason="proto-plus is not installed (make test installs it)")
    code = ("import proto, miscnet, miscnet.v1.bitstream_pb2 as pb\n"
            "assert hasattr(proto, 'Message'), proto.__file__  # proto-plus, not our proto/ folder\n"
            f"assert miscnet.__file__.startswith({str(installed)!r}), miscnet.__file__\n"
            "class Point(proto.Message):\n"
            "    x = proto.Field(proto.INT32, number=1)\n"
            "assert Point.serialize(Point(x=3)) == b'\\x08\\x03'\n"
            "print(pb.Layer(kind=pb.LAYER_KIND_MAP).kind)\n")
    # From the repository root too: its proto/ folder (no __init__.py) must not shadow proto-plus.
    for cwd in (tmp_path, ROOT):
        proc = _run(installed, [sys.executable, "-c", code], cwd=cwd)
        assert proc.returncode == 0, proc.stderr
    proc = _run(installed, [sys.executable, "-m", "miscnet", "encode", "sample:astronaut", "-o", "a.misc"],
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "a.misc").read_bytes() == (ROOT / "tests" / "golden" / "astronaut-default.misc").read_bytes()


def test_committed_scenarios_run_by_name_after_install(installed, tmp_path):
    proc = _run(installed, [sys.executable, "-m", "miscnet", "sweep", "bandwidth", "-o", "bw", "--smoke",
                            "--no-plots", "--quiet", "--workers", "1"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "bw" / "results.csv").is_file()


def test_version_matches_the_project(installed):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = _run(installed, [sys.executable, "-c", "import miscnet; print(miscnet.__version__)"], cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == version


def test_the_core_install_needs_no_model_stack():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(";")[0].split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower() for d in deps}
    assert not names & {"torch", "diffusers", "transformers", "huggingface_hub", "accelerate"}, names

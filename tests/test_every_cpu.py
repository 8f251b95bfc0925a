"""The CPU engine on every CPU it may meet: the C passes build for AVX2-only x86, AVX-512 and arm64
(the last with a cross compiler, so Apple Silicon and ARM laptops are not broken blind), the CPU's
features are read right, and on an AVX-512 machine the CPU-path tests run once more as on an
AVX2-only CPU (ATEN_CPU_CAPABILITY=avx2 caps PyTorch's kernels and xqchat's alike;
ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN's)."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xqchat.backends import hardware
from xqchat.backends.cuda import cpu_kernels

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-lm"]

SKYLAKE_X = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz
flags\t\t: fpu sse2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16
"""
LAPTOP = """processor\t: 0
model name\t: AMD Ryzen 7 5800U with Radeon Graphics
flags\t\t: fpu sse2 avx avx2 fma f16c sha_ni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp bf16 i8mm
CPU part\t: 0xd40
"""


@pytest.mark.parametrize(
    "cpuinfo, machine, cap, level, flags",
    [
        (SKYLAKE_X, "x86_64", None, "avx512-bf16", ["-march=native"]),
        (SKYLAKE_X, "x86_64", "avx2", "avx2", ["-march=x86-64-v3", "-mtune=native"]),
        (SKYLAKE_X, "x86_64", "avx512", "avx512-bf16", ["-march=native"]),
        (SKYLAKE_X, "x86_64", "default", "x86-64", ["-march=x86-64"]),
        (LAPTOP, "x86_64", None, "avx2", ["-march=native"]),
        (GRAVITON, "aarch64", None, "arm64-dotprod", ["-march=native"]),
        (GRAVITON, "aarch64", "avx2", "arm64-dotprod", ["-march=native"]),  # no x86 cap on ARM
    ],
)
def test_cpu_features_and_caps(cpuinfo, machine, cap, level, flags):
    cpu = hardware.parse(cpuinfo, machine, cap)
    assert cpu.level == level and cpu.compile_flags() == flags
    if level == "avx2" and cap:
        assert cpu.has("avx2", "fma") and not cpu.has("avx512f")
        assert cpu.describe()["capped_by"] == "ATEN_CPU_CAPABILITY=avx2"


def test_this_machine_is_read():
    cpu = hardware.cpu()
    assert cpu.arch == {"amd64": "x86_64", "aarch64": "arm64"}.get(
        platform.machine().lower(), platform.machine().lower()
    )
    if cpu.arch == "x86_64" and Path("/proc/cpuinfo").exists():
        assert cpu.has("avx2") == ("avx2" in Path("/proc/cpuinfo").read_text().split())


def compiles(compiler: str, flags: list[str], tmp_path) -> None:
    out = tmp_path / "k.so"
    done = subprocess.run(
        [compiler, *flags, *FLAGS, "-o", str(out), *map(str, cpu_kernels.SOURCES)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.stat().st_size > 0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="an x86 compiler")
@pytest.mark.parametrize("march", ["x86-64", "x86-64-v3", "skylake-avx512", "sapphirerapids"])
def test_c_passes_build_for_every_x86_level(march, tmp_path):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler")
    compiles(compiler, [f"-march={march}"], tmp_path)


@pytest.mark.parametrize("march", ["armv8-a", "armv8.2-a+dotprod+fp16", "armv8.6-a+bf16+i8mm"])
def test_c_passes_build_for_arm64(march, tmp_path):
    """Apple Silicon is armv8.5+ with dot products; Linux ARM laptops from armv8.2. `.ci/run`
    installs Debian's gcc-aarch64-linux-gnu."""
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    if platform.machine() in ("aarch64", "arm64"):
        compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no arm64 compiler (apt install gcc-aarch64-linux-gnu)")
    compiles(compiler, [f"-march={march}"], tmp_path)


@pytest.mark.skipif(
    not hardware.cpu().has("avx512bw") or hardware.cpu().cap is not None,
    reason="the CPU has no AVX-512 (the suite already runs its AVX2 paths) or is capped already",
)
def test_cpu_path_tests_pass_as_on_an_avx2_cpu():
    """The tests of the CPU paths and the C passes (int8's and q4/q8's AVX2 dot products among
    them), run as on an AVX2-only laptop."""
    env = os.environ | {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    tests = ["test_torch_backend.py", "test_cpu_kernels.py"]
    tests += ["test_qweights.py::test_c_pass_equals_the_integer_reference"]
    tests += ["test_qweights.py::test_prompt_chunks_take_each_path"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"]
        + [str(ROOT / "tests" / t) for t in tests],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout.splitlines()[-1]

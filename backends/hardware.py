"""What this machine's CPU offers, read once: the instruction sets that decide which of the CPU
engine's paths can run (oneDNN's packed bf16 needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT, the int8
passes want VNNI or NEON's dot product, ...). Framework-free: `xqchat show --hardware` and the
engines read it alike.

PyTorch's own cap, `ATEN_CPU_CAPABILITY` (default, avx2, avx512), caps this too, so that one
variable makes PyTorch and xqchat behave as on a CPU without AVX-512: the tests use it to run the
AVX2 paths on an AVX-512 machine, and the C passes are then compiled for AVX2 (x86-64-v3)."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

# /proc/cpuinfo's names for what the paths use (x86 `flags`, arm64 `Features`)
X86_FEATURES = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "avx_ne_convert", "amx_bf16", "amx_int8",
)  # fmt: skip
ARM_FEATURES = ("asimd", "asimddp", "asimdhp", "bf16", "i8mm", "sve")
# macOS names the same features in sysctl hw.optional.*
MAC_FEATURES = {
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}
# what ATEN_CPU_CAPABILITY=avx2 / default leave of the x86 features
CAPS = {
    "avx2": {"avx2", "fma", "f16c"},
    "default": set(),
}


@dataclass(frozen=True)
class Cpu:
    arch: str  # "x86_64", "arm64" or what platform.machine() says
    model: str
    features: frozenset[str]
    cap: str | None = None  # ATEN_CPU_CAPABILITY, when it takes features away

    def has(self, *names: str) -> bool:
        return all(name in self.features for name in names)

    @property
    def level(self) -> str:
        """One word for the paths this CPU can run, best first."""
        if self.arch == "x86_64":
            for level, needs in (
                ("avx512-bf16", ("avx512bw", "avx512vl", "avx512dq", "avx512_bf16")),
                ("avx512-vnni", ("avx512bw", "avx512vl", "avx512dq", "avx512_vnni")),
                ("avx512", ("avx512bw", "avx512vl", "avx512dq")),
                ("avx2", ("avx2", "fma")),
            ):
                if self.has(*needs):
                    return level
            return "x86-64"
        if self.arch == "arm64":
            return "arm64-dotprod" if self.has("asimddp") else "arm64"
        return self.arch

    def compile_flags(self) -> list[str]:
        """What the C passes are compiled for: this CPU, or the capped instruction set."""
        if self.arch == "x86_64" and self.cap == "avx2":
            return ["-march=x86-64-v3", "-mtune=native"]  # AVX2, FMA, F16C: no AVX-512
        if self.arch == "x86_64" and self.cap == "default":
            return ["-march=x86-64"]
        return ["-march=native"]

    def describe(self) -> dict:
        return {
            "arch": self.arch,
            "model": self.model,
            "level": self.level,
            "features": sorted(self.features),
            "capped_by": f"ATEN_CPU_CAPABILITY={self.cap}" if self.cap else None,
        }


def _linux(text: str, arch: str) -> tuple[str, set[str]]:
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name", "CPU part") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    known = X86_FEATURES if arch == "x86_64" else ARM_FEATURES
    return model, flags & set(known)


def _mac() -> tuple[str, set[str]]:
    def sysctl(name: str) -> str:
        try:
            out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    features = {feature for name, feature in MAC_FEATURES.items() if sysctl(name) == "1"}
    return sysctl("machdep.cpu.brand_string"), features


def parse(cpuinfo: str | None, machine: str, cap: str | None) -> Cpu:
    """The Cpu that /proc/cpuinfo's text (None: ask macOS's sysctl) describes, under a cap."""
    arch = {"amd64": "x86_64", "aarch64": "arm64"}.get(machine.lower(), machine.lower())
    model, features = _linux(cpuinfo, arch) if cpuinfo is not None else _mac()
    cap = (cap or "").lower() or None
    if arch == "x86_64" and cap in CAPS:
        features &= CAPS[cap]
    else:
        cap = None  # avx512 (or an unknown word) takes nothing away
    return Cpu(arch, model or platform.processor() or arch, frozenset(features), cap)


@functools.cache
def cpu() -> Cpu:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = None if platform.system() == "Darwin" else ""
    return parse(text, platform.machine(), os.environ.get("ATEN_CPU_CAPABILITY"))

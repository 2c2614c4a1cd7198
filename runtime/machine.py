"""What identifies this machine's arithmetic: the CPU model and the instruction sets onnxruntime picks kernels by.

Measurements kept in a bundle's cache (the pass-size verdict, pass costs) hold only for the machine that
made them: onnxruntime's MLAS chooses different kernels on AVX2, AVX-512, VNNI and AMX CPUs, and those
kernels round differently. A bundle copied to another machine must measure again, so every cache key
carries `cpu_tag()`.
"""

from __future__ import annotations

import hashlib
import platform
from functools import cache
from pathlib import Path

# Flags that change which MLAS kernels run (x86 and Arm); the rest of /proc/cpuinfo's list does not.
KERNEL_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "avx_vnni", "avx_vnni_int8", "amx_tile", "amx_int8", "amx_bf16",
                "asimd", "asimddp", "sve", "i8mm", "bf16")


@cache
def cpu_description() -> tuple[str, tuple[str, ...]]:
    """(CPU model name, the kernel-relevant instruction-set flags it reports), from /proc/cpuinfo where it exists."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "CPU part") and not name:
                name = value.strip()
            elif key in ("flags", "Features"):
                flags.update(value.split())
    except OSError:
        pass
    name = name or platform.processor() or platform.machine()
    return name, tuple(f for f in KERNEL_FLAGS if f in flags)


def isa_summary() -> str:
    """A short name of the widest vector instruction set here (for logs and messages)."""
    flags = set(cpu_description()[1])
    if "amx_tile" in flags:
        return "AVX-512 + AMX"
    if "avx512f" in flags:
        return "AVX-512" + (" VNNI" if "avx512_vnni" in flags else "")
    if "avx2" in flags:
        return "AVX2" + (" VNNI" if "avx_vnni" in flags else "")
    return platform.machine()


def cpu_tag() -> str:
    """A short stable digest of the CPU model and its kernel-relevant flags, for cache keys."""
    name, flags = cpu_description()
    text = f"{platform.machine()}|{name}|{' '.join(flags)}"
    return hashlib.sha256(text.encode()).hexdigest()[:10]

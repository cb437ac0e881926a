"""The machine a timing belongs to, for the header of every result that reports one.

Our machines of one kind run on different host CPUs, and the same training takes markedly longer on
some than on others (benchmarks/results/production-training.md), so a timing compares only beside
the CPU it ran on.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'AMD EPYC (family 25, model 1; AVX2, no AVX-512)', or what the platform module knows."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip():  # the first processor's block is enough
            break
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2, no AVX-512" if "avx2" in flags else "no AVX2"
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']}; {vector})"
    return f"{name} ({vector})" if flags else name


def describe() -> str:
    """The CPU, the architecture, the cores and the Python a run used."""
    return f"{cpu()}, {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"

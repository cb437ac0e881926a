"""The machine line of timed results names the host CPU and its vector width."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from training.machine import cpu, describe

AMD = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 avx fma avx2 sha_ni

processor\t: 1
model name\t: something else
flags\t\t: avx512f
"""

INTEL = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu avx avx2 avx512f avx512bw
"""


def test_the_first_processor_is_described(tmp_path: Path) -> None:
    (tmp_path / "amd").write_text(AMD)
    (tmp_path / "intel").write_text(INTEL)
    assert cpu(tmp_path / "amd") == "AMD EPYC (family 25, model 1; AVX2, no AVX-512)"
    assert cpu(tmp_path / "intel") == "Intel(R) Xeon(R) Platinum 8488C (family 6, model 143; AVX-512)"


def test_without_cpuinfo_the_platform_answers(tmp_path: Path) -> None:
    assert cpu(tmp_path / "absent") == (platform.processor() or platform.machine())


def test_describe_names_cores_and_python() -> None:
    line = describe()
    assert f"{os.cpu_count()} cores" in line and platform.python_version() in line

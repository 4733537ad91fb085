"""What this process runs on: versions, devices, and the Triton kernel flavour.

Shared by ``python -m fastattn``, the benchmark reports and the CPU ratio script.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

import fastattn
from fastattn.fused import triton_import_error, triton_version


def environment_lines() -> list[str]:
    """One line each: fastattn, python, torch, triton, numpy, device."""
    lines = [
        f"fastattn  {fastattn.__version__} ({fastattn.__file__.rsplit('/', 1)[0]})",
        f"python    {platform.python_version()} ({platform.python_implementation()}, {platform.platform()})",
        f"torch     {torch.__version__} (CUDA runtime: {torch.version.cuda or 'none'}, "
        f"{torch.get_num_threads()} CPU threads)",
    ]
    err = triton_import_error()
    if err is None:
        lines.append(f"triton    {triton_version()} (fastattn kernels: {_kernel_flavour()})")
    else:
        lines.append(f"triton    not importable: {err}")
    try:
        import numpy

        lines.append(f"numpy     {numpy.__version__}")
    except ImportError as e:
        lines.append(f"numpy     not importable: {e}")
    lines.append(f"cpu       {cpu_name()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i}    {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    else:
        lines.append("cuda      no CUDA device")
    return lines


def use_interpreter_without_gpu() -> None:
    """Without a CUDA device, turn on Triton's interpreter (unless the caller chose a setting).

    Triton fixes whether kernels are compiled or interpreted when it is first imported;
    ``import fastattn`` does not import it, so this works when called before any triton use.
    """
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    os.environ["TRITON_INTERPRET"] = "1"


def _kernel_flavour() -> str:
    try:
        from fastattn.fused.kernels import interpreted

        if interpreted():
            return "Triton's CPU interpreter (TRITON_INTERPRET=1)"
        return "compiled for the GPU"
    except Exception as e:
        return f"cannot be loaded: {type(e).__name__}: {e}"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

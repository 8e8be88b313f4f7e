"""What every stored result records about where it came from: versions, git revision, machine."""

from __future__ import annotations

import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = (
    "sopkit",
    "sopkit-baselines",
    "torch",
    "torchvision",
    "numpy",
    "scikit-learn",
    "mnist1d",
)


#: Left out of the ``-dirty`` check: the repository's ``reports/`` holds only reports that a nox
#: session regenerates, and the run that regenerates them rewrites them as it goes, so their changes
#: say nothing about the code that produced a result.
GENERATED_REPORTS = ":(top,exclude)reports/"


def git_revision(path: Path | None = None) -> str | None:
    """The checked-out commit (with ``-dirty`` when a tracked file outside ``reports/`` has changes),
    or None outside git."""
    cwd = path or Path(__file__).resolve().parent
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ":/", GENERATED_REPORTS],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return revision + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    """The processor's name (``/proc/cpuinfo``'s model name on Linux): step times depend on it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict[str, Any]:
    """Everything needed to say where a result came from."""
    import torch

    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(),
        "versions": library_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        # The vector code torch's own kernels run (e.g. AVX512); oneDNN and MKL choose their own.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }

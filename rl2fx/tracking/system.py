"""System metrics (CPU, memory, GPU) sampled with MLflow's own collectors.

:class:`SystemSampler` reads CPU utilisation and system memory with
:class:`mlflow.system_metrics.metrics.cpu_monitor.CPUMonitor`, GPU utilisation and
memory with MLflow's ``GPUMonitor`` (needs ``nvidia-ml-py``) or, without it, torch's
CUDA memory counters (:class:`TorchCudaMonitor`), plus this process's resident
memory. Keys carry the ``system/`` prefix the tracker logs them under.

>>> sample = SystemSampler().sample()
>>> sample["system/process_memory_rss_megabytes"] > 1.0
True
"""

from __future__ import annotations

from typing import Any

__all__ = ["SystemSampler", "TorchCudaMonitor", "cpu_model"]


def cpu_model() -> str:
    """The CPU's ``model name`` from ``/proc/cpuinfo`` (``platform.processor()`` or the machine type elsewhere),
    for the machine line of benchmark and ablation reports.

    >>> isinstance(cpu_model(), str)
    True
    """
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class SystemSampler:
    """One ``sample()`` call reads every monitor once and returns ``{"system/<name>": value}``."""

    def __init__(self) -> None:
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

        self._process = psutil.Process()
        self.monitors: list[Any] = [CPUMonitor()]
        try:
            import torch

            if torch.cuda.is_available():
                from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

                self.monitors.append(GPUMonitor())  # needs pynvml (nvidia-ml-py)
        except Exception:
            self.monitors.append(TorchCudaMonitor())
        psutil.cpu_percent()  # the first reading is always 0.0; prime it

    def sample(self) -> dict[str, float]:
        """Current readings of every monitor, keyed ``system/<metric>``."""
        out: dict[str, float] = {}
        for m in self.monitors:
            m.collect_metrics()
            out.update(m.aggregate_metrics())
            m.clear_metrics()
        out["process_memory_rss_megabytes"] = self._process.memory_info().rss / 1e6
        return {f"system/{k}": float(v) for k, v in out.items()}


class TorchCudaMonitor:
    """GPU memory from torch when pynvml is unavailable (MLflow's monitor interface)."""

    def __init__(self) -> None:
        self._metrics: dict[str, float] = {}

    def collect_metrics(self) -> None:
        """Read allocated and reserved memory of every visible CUDA device."""
        import torch

        for i in range(torch.cuda.device_count()):
            self._metrics[f"gpu_{i}_memory_allocated_megabytes"] = torch.cuda.memory_allocated(i) / 1e6
            self._metrics[f"gpu_{i}_memory_reserved_megabytes"] = torch.cuda.memory_reserved(i) / 1e6

    def aggregate_metrics(self) -> dict[str, float]:
        """The last readings."""
        return dict(self._metrics)

    def clear_metrics(self) -> None:
        """Forget the readings (the next ``collect_metrics`` starts fresh)."""
        self._metrics = {}

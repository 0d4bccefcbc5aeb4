"""What ran where: machine and library versions, and GPU telemetry from NVML (nvidia-ml-py).

The theoretical memory bandwidth is ``max memory clock x 2 (double data rate) x bus width / 8``:
e.g. H100 SXM 2619 MHz x 2 x 5120 bit / 8 = 3.35 TB/s, RTX 4090 10501 MHz x 2 x 384 bit / 8 = 1.01 TB/s.
Every NVML query that a device or driver does not support is recorded as None instead of failing.
"""
import datetime
import importlib.metadata
import os
import platform
import socket
import subprocess

import torch


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        proc = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def machine() -> dict:
    """Host, CPU and the versions of everything that decides the numbers."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in
                     ("fastgen", "torch", "triton", "numpy", "diffusers", "nvidia-ml-py")},
        "cuda_runtime": torch.version.cuda,
        "git_commit": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _query(fn, *args, scale=1.0):
    """An NVML query's value (scaled), or None when the device or driver does not support it."""
    try:
        value = fn(*args)
    except Exception:  # NVMLError_NotSupported, NoPermission, ...: record as unknown
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return value * scale if scale != 1.0 else value


class GPU:
    """NVML view of the CUDA device the benchmark runs on. ``available`` is False (with ``reason``)
    when there is no CUDA device, nvidia-ml-py is missing or NVML cannot start."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.available, self.reason, self.nvml, self.handle = False, None, None, None
        if self.device.type != "cuda":
            self.reason = "no CUDA device: CPU run"
            return
        try:
            import pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
            return
        try:
            pynvml.nvmlInit()
            self.handle = self._handle(pynvml)
        except Exception as e:  # pynvml.NVMLError and friends
            self.reason = f"NVML unavailable: {e}"
            return
        self.nvml, self.available = pynvml, True

    def _handle(self, nvml):
        """The NVML handle of torch's device: by UUID (right under CUDA_VISIBLE_DEVICES), else by index."""
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            try:
                text = str(uuid)
                return nvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            except Exception:
                pass
        return nvml.nvmlDeviceGetHandleByIndex(index)

    def static(self) -> dict:
        """Name, driver, memory, maximum clocks, bus width and theoretical bandwidth."""
        info = {"available": self.available, "reason": self.reason}
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            info.update(torch_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                        sm_count=props.multi_processor_count, torch_memory_bytes=props.total_memory,
                        l2_cache_bytes=getattr(props, "L2_cache_size", None))
        if self.available:
            info.update(nvml_static(self.nvml, self.handle))
        return info

    def sample(self) -> dict:
        """Clocks, power and temperature now (taken before and after the run)."""
        return nvml_sample(self.nvml, self.handle) if self.available else {}

    def close(self):
        if self.available:
            _query(self.nvml.nvmlShutdown)


def theoretical_bandwidth_gbs(memory_clock_mhz, bus_width_bits):
    """GB/s (1e9 bytes/s) from the memory clock and bus width (double data rate); None if unknown."""
    if not memory_clock_mhz or not bus_width_bits:
        return None
    return memory_clock_mhz * 1e6 * 2 * bus_width_bits / 8 / 1e9


def nvml_static(nv, h) -> dict:
    """Name, driver, memory size, maximum clocks, bus width, power limit and theoretical bandwidth
    of NVML device handle ``h`` (``nv``: the pynvml module)."""
    memory = _query(nv.nvmlDeviceGetMemoryInfo, h)
    max_memory_clock = _query(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_MEM)
    bus_width = _query(nv.nvmlDeviceGetMemoryBusWidth, h)
    return {
        "name": _query(nv.nvmlDeviceGetName, h),
        "driver": _query(nv.nvmlSystemGetDriverVersion),
        "memory_total_bytes": getattr(memory, "total", None),
        "max_sm_clock_mhz": _query(nv.nvmlDeviceGetMaxClockInfo, h, nv.NVML_CLOCK_SM),
        "max_memory_clock_mhz": max_memory_clock,
        "memory_bus_width_bits": bus_width,
        "power_limit_w": _query(nv.nvmlDeviceGetEnforcedPowerLimit, h, scale=1e-3),
        "theoretical_bandwidth_gbs": theoretical_bandwidth_gbs(max_memory_clock, bus_width),
    }


def nvml_sample(nv, h) -> dict:
    """Clocks, power, temperature and utilization of NVML device handle ``h`` now."""
    return {
        "sm_clock_mhz": _query(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_SM),
        "memory_clock_mhz": _query(nv.nvmlDeviceGetClockInfo, h, nv.NVML_CLOCK_MEM),
        "power_w": _query(nv.nvmlDeviceGetPowerUsage, h, scale=1e-3),
        "temperature_c": _query(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU),
        "utilization_percent": getattr(_query(nv.nvmlDeviceGetUtilizationRates, h), "gpu", None),
        # bitmask of why clocks are below maximum (power cap, thermal, ...); 0 = none
        "clocks_event_reasons": _query(getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
                                       or nv.nvmlDeviceGetCurrentClocksThrottleReasons, h),
    }

"""What every benchmark prints about the machine it ran on (shared by the bench/ scripts)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(device=None) -> dict:
    """A flat dict: CPU, cores, load average, accelerator, library versions."""
    import torch  # noqa: PLC0415 -- a stdlib-only module: torch only when its version is asked for

    info = {
        "cpu": cpu_model(),
        "usable_cores": usable_cores(),
        "os_cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15": load_average(),
        "platform": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "megatron_core": version("megatron-core"),
        "transformer_engine": version("transformer_engine") if version("transformer_engine")
        != "not installed" else version("transformer-engine"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    else:
        info["gpu"] = "none"
    if device is not None:
        info["device"] = str(device)
    return info


def format_machine(info: dict) -> str:
    gpu = f"; GPU {info['gpu']} (CUDA {info.get('cuda')})" if info.get("gpu") != "none" else ""
    return (f"{info['cpu']}; {info['usable_cores']} usable cores, torch threads "
            f"{info['torch_threads']}; load average {info['load_average_1_5_15']}{gpu}; "
            f"{info['platform']}; Python {info['python']}; torch {info['torch']}; "
            f"megatron-core {info['megatron_core']}; Transformer Engine "
            f"{info['transformer_engine']}")


def split_passthrough(argv: list) -> tuple[list, list]:
    """Split a benchmark's argv at `--`: its own flags, then flags passed on to the trainer."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1:]


def finish(results: dict, json_path) -> None:
    """The closing lines every benchmark prints: the load average around the run, and where the
    results went (`json_path`, written when set)."""
    print(f"\nload average: {results['load_start']} at the start, {results['load_end']} at the "
          "end")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
        print(f"results: {json_path}")

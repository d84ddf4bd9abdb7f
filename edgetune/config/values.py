"""Value helpers shared by the config sections: comma-separated lists, device lists, GPU shares."""

from __future__ import annotations

import math

Scalar = bool | int | float | str
"""A config value: every key of the tree is one of these (lists travel as comma-separated strings)."""


def split_csv(value: str) -> tuple[str, ...]:
    """``"a, b,,c"`` -> ``("a", "b", "c")``."""
    return tuple(v.strip() for v in value.split(",") if v.strip())


def is_power_of_two(x: float) -> bool:
    """True for a finite positive power of two (``2**k``, k any integer)."""
    if x <= 0 or not math.isfinite(x):
        return False
    mantissa, _ = math.frexp(x)
    return mantissa == 0.5


def check_gpus_per_site(value: float, name: str) -> float:
    """Flower's Ray backend takes a fraction of one GPU (0 < f <= 1) or a whole number of GPUs."""
    v = float(value)
    if not (math.isfinite(v) and v >= 0 and (v <= 1 or v.is_integer())):
        raise ValueError(f"{name} must be 0, a fraction in (0, 1] or a whole number of GPUs, got {value!r}")
    return v


def device_list(spec: str) -> tuple[str, ...]:
    """``model.device`` as a list: ``cuda:0,cuda:1`` names several devices of one site."""
    devices = split_csv(spec)
    if not devices:
        raise ValueError("model.device must not be empty (auto, cpu, cuda[:N] or a comma-separated list)")
    if len(devices) > 1 and "auto" in devices:
        raise ValueError(f"model.device: 'auto' cannot be part of a device list, got {spec!r}")
    return devices

"""``RunConfig``, the whole tree, and its flat form: ``flatten`` and ``from_run_config``.

Checks that span sections (an algorithm's needs of the model, schedules over all rounds, integer bounds
of every key) live here; each section checks its own keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from edgetune import schedules
from edgetune.config.algorithms import (
    ALGORITHM_NAMES,
    DeftSection,
    DppfSection,
    KavgSection,
    LowrankSection,
    SpsaSection,
)
from edgetune.config.sections import CryptoSection, DataSection, EvalSection, ImvSection, ModelSection, RunSection
from edgetune.config.values import Scalar

INT_LIMITS: dict[str, tuple[int, int]] = {
    "num_rounds": (1, 1_000_000),
    "run.seed": (-(2**63), 2**63 - 1),  # the data stream key packs it as a signed 64-bit integer
    "run.num_sites": (0, 100_000),
    "run.min_sites": (1, 100_000),
    "run.keep_checkpoints": (1, 1_000),
    "model.lora_rank": (1, 4_096),
    "data.demo_facts": (1, 100_000),
    "data.max_length": (8, 131_072),
    "data.batch_size": (1, 4_096),
    "eval.num_examples": (1, 1_000_000),
    "eval.batch_size": (1, 4_096),
    "eval.max_new_tokens": (1, 4_096),
    "spsa.num_steps": (1, 10_000),
    "spsa.num_probes": (1, 10_000),
    "spsa.seed_pool": (0, 1_000_000),
    "kavg.local_steps": (1, 100_000),
    "imv.num_directions": (1, 1_024),
    "imv.num_examples": (1, 100_000),
    "imv.bisect_steps": (1, 64),
}
"""Bounds of integer keys that size memory, compute or the wire (a batch of 1e12 examples or 1e9 local
steps is a typo, not a plan). Any other integer key must lie in ``DEFAULT_INT_RANGE``."""
DEFAULT_INT_RANGE = (-(2**31), 2**31 - 1)


def _check_int_bounds(flat: dict[str, Any], *, upper_only: bool = False) -> None:
    """Every integer of a flat config within its ``INT_LIMITS`` range (``ValueError`` naming the key).

    ``from_run_config`` checks the upper bounds before any section is built, so an absurd size is named
    as such rather than by a section's own check (spsa's K x P <= 65536 is ``SpsaSection``'s); values
    below a section's minimum get that section's message.
    """
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        lo, hi = INT_LIMITS.get(key, DEFAULT_INT_RANGE)
        if value > hi or (value < lo and not upper_only):
            raise ValueError(f"{key} = {value} is outside [{lo:,}, {hi:,}]")


def _check_bounds(cfg: RunConfig) -> None:
    _check_int_bounds(flatten(cfg))


def _check_trim(cfg: RunConfig) -> None:
    """A trimmed mean that trims nothing for the smallest quorum is a mean: refuse it."""
    section = "spsa" if cfg.algorithm == "spsa" else "kavg"
    sec = getattr(cfg, section)
    if sec.aggregator != "trimmed":
        return
    if math.floor(sec.trim_frac * cfg.run.min_sites) < 1:
        need = math.ceil(1 / sec.trim_frac) if sec.trim_frac > 0 else None
        raise ValueError(
            f"{section}.aggregator = 'trimmed' with {section}.trim_frac = {sec.trim_frac} trims nothing when a round "
            f"commits with run.min_sites = {cfg.run.min_sites} sites (floor({sec.trim_frac} x {cfg.run.min_sites}) "
            f"= 0): raise run.min_sites to {need or 'a count that trims'} or more, or {section}.trim_frac to "
            f"{1 / cfg.run.min_sites:.4g} or more"
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole configuration of one federated run."""

    algorithm: str = "spsa"
    """Which algorithm section is active."""
    num_rounds: int = 3
    """Rounds of federation."""
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    crypto: CryptoSection = field(default_factory=CryptoSection)
    spsa: SpsaSection = field(default_factory=SpsaSection)
    kavg: KavgSection = field(default_factory=KavgSection)
    lowrank: LowrankSection = field(default_factory=LowrankSection)
    deft: DeftSection = field(default_factory=DeftSection)
    dppf: DppfSection = field(default_factory=DppfSection)
    imv: ImvSection = field(default_factory=ImvSection)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHM_NAMES:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHM_NAMES)}, got {self.algorithm!r}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if self.algorithm == "lowrank" and self.model.trainable.strip() != "lora":
            raise ValueError("algorithm = 'lowrank' trains LoRA factors: set model.trainable = 'lora'")
        label_head = self.model.trainable.strip() == "label-head"
        if label_head and not self.model.head_labels:
            if self.data.source != "triage":
                raise ValueError(
                    "model.trainable = 'label-head' needs model.head_labels: your task's labels, comma-separated "
                    "(and model.head_prefix, the text each answer follows, if your rows have an answer_prefix)"
                )
            from edgetune.data import triage

            labels = ",".join(triage.CATEGORIES)
            model = dataclasses.replace(self.model, head_labels=labels, head_prefix=triage.ANSWER_PREFIX)
            object.__setattr__(self, "model", model)
        if label_head and self.algorithm == "spsa" and self.spsa.objective != "choices":
            raise ValueError(
                "model.trainable = 'label-head' with spsa needs spsa.objective = 'choices': its probes score the "
                "label tokens from cached features; the answer objective would cost a full forward pass per probe"
            )
        token_bias = self.model.trainable.strip() == "token-bias"
        if token_bias and self.algorithm == "spsa" and self.spsa.objective != "answer":
            raise ValueError(
                "model.trainable = 'token-bias' with spsa needs spsa.objective = 'answer': its probes score the "
                "next-token loss of cached answer tokens"
            )
        if self.run.portable_sites and self.crypto.keys_dir:
            raise ValueError(
                "run.portable_sites hands each simulated site a kit the server generated for the run; with "
                f"crypto.keys_dir = {self.crypto.keys_dir!r} sites keep their own kits: unset one of them"
            )
        _check_bounds(self)
        _check_trim(self)
        lr_sched = schedules.parse(self.spsa.lr_schedule, key="spsa.lr_schedule")
        for r in range(1, self.num_rounds + 1):
            if not lr_sched.value(self.spsa.lr, r, self.num_rounds) > 1e-12 * self.spsa.lr:
                raise ValueError(
                    f"spsa.lr_schedule {self.spsa.lr_schedule!r} gives lr 0 in round {r} of {self.num_rounds}: "
                    "give it a floor (e.g. 'cosine:0.05')"
                )
        if self.algorithm != "spsa":
            lr = schedules.parse(self.kavg.lr_schedule, key="kavg.lr_schedule")
            for r in range(1, self.num_rounds + 1):
                if not lr.value(self.kavg.lr, r, self.num_rounds, self.kavg.warmup_rounds) > 0:
                    raise ValueError(
                        f"kavg.lr_schedule = {self.kavg.lr_schedule!r} gives lr 0 in round {r} of {self.num_rounds}: "
                        "give it a floor above 0 (cosine:0.1, linear:0.1)"
                    )
        if self.algorithm == "spsa" and self.model.dtype != "float32":
            # spsa perturbs the weights the forward pass reads by +-eps*z with eps a power of two, exact
            # only in fp32: in bf16 (8 significant bits) w +- 2^-10 rounds back to w for |w| >= 2^-2, so
            # the probe measures rounding, not the loss slope. Masters are fp32 anyway.
            raise ValueError(
                f"algorithm = 'spsa' needs model.dtype = 'float32' (got {self.model.dtype!r}): in bf16/fp16 the "
                "+-eps perturbations round away; use a backprop algorithm (kavg, lowrank) for bf16 weights"
            )
        if self.algorithm == "spsa" and self.model.quantize != "none":
            raise ValueError("algorithm = 'spsa' perturbs the weights themselves: model.quantize must be 'none'")
        if self.algorithm == "spsa" and (self.model.gradient_checkpointing or self.model.autocast != "none"):
            raise ValueError(
                "model.gradient_checkpointing and model.autocast apply to backprop training; spsa runs forward only"
            )


def _sections() -> dict[str, type]:
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(RunConfig)
        if f.default_factory is not dataclasses.MISSING
    }


def flatten(cfg: RunConfig) -> dict[str, Scalar]:
    """Return ``{"section.key": value}`` for every field, top-level keys without a section."""
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def _coerce(key: str, value: Any, default: Scalar) -> Scalar:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        try:
            as_float = float(value)
        except ValueError as err:
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}") from err
        if not as_float.is_integer():
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from err
        if not math.isfinite(out):
            raise ValueError(f"config key {key!r}: expected a finite number, got {value!r}")
        return out
    if not isinstance(value, str):
        raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def from_run_config(flat: dict[str, Any]) -> RunConfig:
    """Build a ``RunConfig`` from dotted keys (Flower's ``context.run_config``, a recipe).

    Unknown keys and values of the wrong type raise ``ValueError`` naming the key.
    """
    defaults = flatten(RunConfig())
    unknown = sorted(set(flat) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    values = {k: _coerce(k, v, defaults[k]) for k, v in flat.items()}
    _check_int_bounds(values, upper_only=True)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    sections = _sections()
    for section, kwargs in nested.items():
        top[section] = sections[section](**kwargs)
    return RunConfig(**top)

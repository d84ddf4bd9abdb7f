"""The one protocol every algorithm implements: a server half and a client half.

A round is a sequence of phases (``phases``; most algorithms have one, ``"train"``). For each
phase the server half ``configure``s one payload per site, the transport (``inproc.py`` or
Flower, ``edgetune/flower``) encodes and delivers them, every site's client half answers with
``step``, and the server half ``aggregate``s the decoded replies. Payloads are flat dicts of
bytes and scalars (``comm/wire.py``); the transport counts their encoded size.

Client halves are pure in their per-site state: ``step(phase, msg, state) -> (reply, state)``.
Resources that are expensive and shared (the model, the tokenised data, the keys) live on the
client half object; anything that must survive between rounds for one site lives in ``state``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from edgetune.comm.wire import Payload


class ReplyRejected(ValueError):
    """A site's reply failed validation; the round goes on without it."""


@dataclass
class RoundResult:
    """What ``aggregate`` reports for one phase."""

    committed: bool
    """False when fewer than ``min_sites`` replies were valid: nothing was applied."""
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    """site id -> why its reply was rejected."""
    accepted: tuple[str, ...] = ()


@dataclass
class ServerContext:
    """Resources of the server half."""

    run_id: bytes
    model: nn.Module
    tokenizer: Any
    workdir: Path
    server_keys: Any = None
    registry: Any = None


@dataclass
class ClientContext:
    """Resources of one site's client half."""

    site_id: str
    model: nn.Module
    tokenizer: Any
    train_set: Any
    workdir: Path
    site_keys: Any = None
    replica_namespace: str = ""
    state_dir: Path | None = None
    """Persistent per-site folder that outlives processes (error-feedback residuals, local copies);
    algorithms keep one subfolder per run there."""


class ServerHalf(Protocol):
    """Plans each round and aggregates the replies."""

    phases: tuple[str, ...]

    def configure(self, round_idx: int, phase: str, site_ids: list[str]) -> dict[str, Payload]: ...

    def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> RoundResult: ...

    def global_model(self) -> nn.Module: ...

    def state_hash(self) -> str: ...

    def max_reply_bytes(self, phase: str) -> int:
        """Replies longer than this are rejected before parsing."""
        ...


class ClientHalf(Protocol):
    """One site's local work."""

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]: ...


@dataclass(frozen=True)
class AlgorithmSpec:
    """Registry entry: the names an algorithm is built from."""

    name: str
    server_cls: type
    client_cls: type

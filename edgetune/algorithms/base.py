"""The one protocol every algorithm implements: a server half and a client half.

A round is a sequence of phases (``phases``; most algorithms have one, ``"train"``). For each
phase the server half ``configure``s one payload per site, the transport (``inproc.py`` or
Flower, ``edgetune/flower``) encodes and delivers them, every site's client half answers with
``step``, and the server half ``aggregate``s the decoded replies. Payloads are flat dicts of
bytes and scalars (``comm/wire.py``); the transport counts their encoded size. After every
round (and before a round's messages go out) the loop persists the server half with
``save_state``; a restarted server continues from ``load_state`` (``federation.py``).

Client halves keep three kinds of things apart:

* resources that are expensive and shared (the model, the tokenised data, the keys) live on the
  client half object and its ``ClientContext``;
* ``state``, ``step(phase, msg, state) -> (reply, state)``: small values the transport keeps for
  the site (Flower's ``context.state``), such as spsa's replay guard;
* what one site must remember between rounds or phases, which may run in other processes
  (dppf's own copy x_i, deft's residual, spsa's replica of theta), lives in the per-site store
  ``ClientContext.store`` (``sitestore.py``): one folder per run and algorithm, atomic files.

Anything an algorithm caches per process (spsa's replicas) is dropped by its spec's
``forget_process_state`` when an in-process run starts afresh (``inproc.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from edgetune.algorithms.sitestore import SiteStore
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
    """Persistent per-site folder that outlives processes (``<cache>/sites/<site>``; None in tests)."""

    @property
    def store(self) -> SiteStore:
        """The site's store of per-run state: under ``state_dir``, else the process workdir."""
        if self.state_dir is not None:
            return SiteStore(Path(self.state_dir), persistent=True)
        return SiteStore(Path(self.workdir) / "sites" / self.site_id, persistent=False)


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

    def save_state(self, folder: Path, committed_round: int) -> None:
        """Write what a restarted server needs into ``folder`` (it may hold hard links to the previous
        state's files: replace files atomically, never write into them in place).
        """
        ...

    def load_state(self, folder: Path) -> int:
        """Restore what ``save_state`` wrote (checked, e.g. against a recorded hash); return its round."""
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
    forget_process_state: Callable[[], None] = lambda: None
    """Drop what the algorithm caches per process (a new in-process run starts from the base weights)."""

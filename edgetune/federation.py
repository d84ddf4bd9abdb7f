"""The round loop, independent of how messages travel.

    for round r = 1..R:
        for phase in server.phases:
            payloads = server.configure(r, phase, sites)        # one per site
            replies  = transport.exchange(r, phase, encode(payloads))
            result   = server.aggregate(r, phase, decode(replies), min_sites=quorum)
        evaluate, record (metrics.jsonl, ledger, checkpoint)

``inproc.py`` supplies a transport that calls the client halves directly; ``edgetune/flower``
supplies one built on ``grid.send_and_receive``. Both go through this loop, so the two paths
cannot drift apart. Bytes are counted here, where payloads are encoded and decoded.

A round without quorum is retried with the same round id (and, for spsa, the same secret and
byte-identical envelopes) up to ``MAX_ROUND_ATTEMPTS`` times; then the run stops with an error
naming every site's failure. No round is ever skipped silently.

Crash safety (``serverstate.py``, ``journal.py``): the server half's state (``save_state``) goes
into a new folder before the journal line that names it; the journal line is the single commit
point, so a kill at any point, a torn journal line or a full disk leaves a run that resumes and
ends on the uninterrupted run's state hash. ``faults.point`` marks
every step of a round (``FAULT_POINTS``) for the crash tests.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgetune import faults, serverstate
from edgetune.algorithms.base import RoundResult, ServerHalf
from edgetune.comm import wire
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.crypto import schedule
from edgetune.journal import Journal
from edgetune.runs import RunRecorder
from edgetune.serverstate import committed_state_folder  # noqa: F401  (spsa/delta.py finds it here)

MAX_ROUND_ATTEMPTS = 3

FAULT_POINTS = (
    "plan-saved",  # round r's plan state folder written, its journal line not yet
    "after-plan",  # the plan line is on disk; nothing sent
    "after-exchange",  # replies in, nothing aggregated
    "after-aggregate",  # the server half applied round r in memory only
    "commit-saved",  # round r's state folder written, its commit line not yet
    "after-ledger",  # ledger written, commit line not yet
    "after-commit",  # the commit line is on disk
    "after-row",  # the metrics row is on disk, the checkpoint (if due) not yet
    "after-checkpoint",  # the round is fully recorded
    "after-summary",  # (last round) summary written, finished line not yet
)
"""Every step of a round at which the crash tests kill the server (``faults.point(name, round)``)."""


@dataclass(frozen=True)
class Failure:
    """A site that did not answer usefully (error reply, timeout, transport error)."""

    reason: str


class Transport(Protocol):
    """Delivers encoded payloads to sites and returns their encoded replies."""

    def sites(self) -> list[str]: ...

    def exchange(
        self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float
    ) -> dict[str, bytes | Failure]: ...

    def drain_stale(self) -> dict[str, str]:
        """Replies that arrived after their exchange closed (reported as failures, never applied)."""
        ...


class RoundFailed(RuntimeError):
    """A round could not reach quorum after all attempts."""


Evaluator = Callable[[Any, bool], dict[str, float]]


ERROR_PAYLOAD_BYTES = 4096
"""A site may explain a failure in up to this many bytes, even when its normal reply is smaller."""


def _decode_replies(raw: dict[str, bytes | Failure], max_bytes: int) -> tuple[dict[str, Payload], dict[str, str]]:
    replies: dict[str, Payload] = {}
    failed: dict[str, str] = {}
    for site, blob in raw.items():
        if isinstance(blob, Failure):
            failed[site] = blob.reason
            continue
        try:
            payload = wire.decode(blob, max_bytes=max(max_bytes, ERROR_PAYLOAD_BYTES))
        except WireError as err:
            failed[site] = f"malformed reply: {err}"
            continue
        if set(payload) == {"error"} and isinstance(payload["error"], str):
            failed[site] = f"site error: {payload['error'][:1000]}"
            continue
        if len(blob) > max_bytes:
            failed[site] = f"reply of {len(blob)} bytes exceeds the limit of {max_bytes}"
            continue
        replies[site] = payload
    return replies, failed


def sample_sites(cfg: RunConfig, round_idx: int, sites: list[str]) -> list[str]:
    """The sites asked in round ``round_idx`` (``run.sites_per_round``; all when it is 0).

    A keyed permutation of the sorted site ids from the ``sites`` stream of ``run.seed`` and the
    round number: a resumed or retried round asks the same sites, and no global RNG is touched.
    At least ``run.min_sites`` are asked (as Flower strategies sample at least their minimum).
    """
    spr = cfg.run.sites_per_round
    if spr <= 0 or not sites:
        return list(sites)
    ordered = sorted(sites)
    n = len(ordered)
    want = math.ceil(spr * n) if spr < 1 else int(spr)
    want = min(n, max(want, cfg.run.min_sites, 1))
    if want == n:
        return list(sites)
    key = schedule.derive(schedule.run_key(cfg.run.seed), "sites", round_idx)
    chosen = {ordered[int(i)] for i in schedule.permutation(key, n)[:want]}
    return [s for s in sites if s in chosen]


def run_round(
    cfg: RunConfig,
    server: ServerHalf,
    transport: Transport,
    recorder: RunRecorder,
    round_idx: int,
    on_planned: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], dict[str, str], int]:
    """Run all phases of one round (retrying without quorum); return metrics, rejections, attempts."""
    failures: dict[str, str] = {}
    for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
        metrics: dict[str, float] = {}
        earlier_phase: dict[str, str] = {}
        failures = {}
        committed = True
        for phase in server.phases:
            sites = sample_sites(cfg, round_idx, transport.sites())
            payloads = server.configure(round_idx, phase, sites)
            if on_planned is not None:
                on_planned(round_idx)  # saved before anything is sent: a restart resends these bytes
            blobs = {site: wire.encode(p) for site, p in payloads.items()}
            for site, blob in blobs.items():
                recorder.ledger.add(round_idx, phase, site, "down", len(blob))
            raw = transport.exchange(round_idx, phase, blobs, timeout_s=cfg.run.round_timeout_s)
            faults.point("after-exchange", round_idx)
            for site, reply in raw.items():
                if isinstance(reply, bytes):
                    recorder.ledger.add(round_idx, phase, site, "up", len(reply))
            replies, failed = _decode_replies(raw, server.max_reply_bytes(phase))
            failed.update(transport.drain_stale())
            result: RoundResult = server.aggregate(round_idx, phase, replies, min_sites=cfg.run.min_sites)
            failures.update(failed)
            failures.update(result.rejected)
            for key, value in result.metrics.items():
                # a metric keeps its plain name; if a later phase reports it again, the earlier
                # phase's value moves to "<phase>.<key>" (deft: num_accepted = values phase)
                if key in metrics and key in earlier_phase:
                    metrics[f"{earlier_phase[key]}.{key}"] = metrics[key]
                metrics[key] = value
                earlier_phase[key] = phase
            if not result.committed:
                committed = False
                break
        if committed:
            return metrics, failures, attempt
    connected = len(transport.sites())
    if connected < cfg.run.min_sites:
        raise RoundFailed(
            f"round {round_idx} cannot reach quorum: {connected} sites are connected, fewer than run.min_sites = "
            f"{cfg.run.min_sites}; start more sites or lower run.min_sites"
        )
    detail = "; ".join(f"{s}: {r}" for s, r in sorted(failures.items())) or "no site answered"
    raise RoundFailed(
        f"round {round_idx} did not reach quorum ({cfg.run.min_sites} sites) in {MAX_ROUND_ATTEMPTS} attempts: {detail}"
    )


def _probe_imv(cfg: RunConfig, server: ServerHalf, tokenizer: Any, transport: Transport) -> dict[str, float]:
    """Checkpoint IMV of the aggregated model (forward-only; restores the weights exactly and
    draws only from the ``imv`` stream, so training is unaffected).
    """
    from edgetune.metrics.imv import imv_examples, imv_metrics, model_imv

    examples = imv_examples(cfg, len(transport.sites()))
    return imv_metrics(model_imv(server.global_model(), tokenizer, examples, cfg))


def _checkpoint_due(cfg: RunConfig, r: int) -> bool:
    return r == cfg.num_rounds or bool(cfg.run.checkpoint_every and r % cfg.run.checkpoint_every == 0)


def _record_round(
    cfg: RunConfig,
    server: ServerHalf,
    transport: Transport,
    recorder: RunRecorder,
    evaluate: Evaluator,
    tokenizer: Any,
    r: int,
    row: dict[str, Any],
    t0: float,
) -> Path | None:
    """Evaluate (held-out loss, accuracy, IMV as configured), write the metrics row, checkpoint."""
    last = r == cfg.num_rounds
    if last or r % cfg.eval.every_rounds == 0:
        acc_every = cfg.eval.accuracy_every_rounds
        row.update(evaluate(server.global_model(), last or (acc_every > 0 and r % acc_every == 0)))
    if cfg.imv.every_rounds and (last or r % cfg.imv.every_rounds == 0):
        row.update(_probe_imv(cfg, server, tokenizer, transport))
    row["state_hash"] = server.state_hash()
    row["wall_s"] = round(time.time() - t0, 3)
    recorder.round_done(row)
    faults.point("after-row", r)
    if _checkpoint_due(cfg, r):
        imv: dict[str, Any] = {k: row[k] for k in ("imv", "imv_radius", "imv_base_loss", "imv_capped") if k in row}
        return recorder.checkpoint(server.global_model(), tokenizer, r, {"state_hash": server.state_hash(), **imv})
    return None


def run_federation(
    cfg: RunConfig,
    server: ServerHalf,
    transport: Transport,
    recorder: RunRecorder,
    evaluate: Evaluator,
    tokenizer: Any,
) -> dict[str, Any]:
    """Evaluate round 0, run ``cfg.num_rounds`` rounds, checkpoint, and write the summary.

    A run folder that already has committed rounds (a killed server, restarted) continues after
    the last committed round with the saved server state; a finished run is refused.
    """
    journal = Journal(recorder.dir)
    committed = serverstate.resume(cfg, server, recorder, journal)
    if not journal.records:
        journal.start(recorder.dir.name, serverstate.training_identity(cfg))

    def planned(round_idx: int) -> None:
        state = serverstate.save_state(server, recorder, journal, "plan", round_idx)
        faults.point("plan-saved", round_idx)
        journal.plan(round_idx, state)
        serverstate.prune_states(recorder, journal)
        faults.point("after-plan", round_idx)

    if not recorder.rows:
        t0 = time.time()
        ev = evaluate(server.global_model(), True)
        if cfg.imv.every_rounds:
            ev.update(_probe_imv(cfg, server, tokenizer, transport))
        recorder.round_done({"round": 0, **ev, "wall_s": round(time.time() - t0, 3), "state_hash": server.state_hash()})
    last_ckpt = None
    if committed and not any(row["round"] == committed for row in recorder.rows):
        # killed between the commit and its metrics row: rebuild the row, re-evaluating the model
        last_ckpt = _record_round(
            cfg,
            server,
            transport,
            recorder,
            evaluate,
            tokenizer,
            committed,
            dict(journal.commit_record(committed)["metrics"]),
            time.time(),
        )
    elif (
        committed
        and _checkpoint_due(cfg, committed)
        and not (recorder.dir / "checkpoints" / f"round-{committed:04d}").exists()
    ):
        # killed between the metrics row and the checkpoint: write the checkpoint now
        last_ckpt = recorder.checkpoint(
            server.global_model(), tokenizer, committed, {"state_hash": server.state_hash()}
        )
    for r in range(committed + 1, cfg.num_rounds + 1):
        t0 = time.time()
        metrics, rejected, attempts = run_round(cfg, server, transport, recorder, r, on_planned=planned)
        faults.point("after-aggregate", r)
        row: dict[str, Any] = {"round": r, **metrics, "attempts": attempts, "train_wall_s": round(time.time() - t0, 3)}
        if rejected:
            row["rejected"] = rejected
        state = serverstate.save_state(server, recorder, journal, "commit", r)
        faults.point("commit-saved", r)
        recorder.ledger.write_jsonl(recorder.dir / "ledger.jsonl")
        faults.point("after-ledger", r)
        journal.commit(r, server.state_hash(), row, state)
        serverstate.prune_states(recorder, journal)
        faults.point("after-commit", r)
        last_ckpt = _record_round(cfg, server, transport, recorder, evaluate, tokenizer, r, row, t0) or last_ckpt
        faults.point("after-checkpoint", r)
    summary = recorder.finish({"checkpoint": str(last_ckpt) if last_ckpt else None})
    faults.point("after-summary", cfg.num_rounds)
    journal.finish(cfg.num_rounds)
    return summary

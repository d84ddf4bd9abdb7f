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
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from edgetune.algorithms.base import RoundResult, ServerHalf
from edgetune.comm import wire
from edgetune.comm.wire import Payload, WireError
from edgetune.config import RunConfig
from edgetune.runs import RunRecorder

MAX_ROUND_ATTEMPTS = 3


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


def run_round(
    cfg: RunConfig, server: ServerHalf, transport: Transport, recorder: RunRecorder, round_idx: int
) -> tuple[dict[str, float], dict[str, str], int]:
    """Run all phases of one round (retrying without quorum); return metrics, rejections, attempts."""
    failures: dict[str, str] = {}
    for attempt in range(1, MAX_ROUND_ATTEMPTS + 1):
        metrics: dict[str, float] = {}
        earlier_phase: dict[str, str] = {}
        failures = {}
        committed = True
        for phase in server.phases:
            sites = transport.sites()
            payloads = server.configure(round_idx, phase, sites)
            blobs = {site: wire.encode(p) for site, p in payloads.items()}
            for site, blob in blobs.items():
                recorder.ledger.add(round_idx, phase, site, "down", len(blob))
            raw = transport.exchange(round_idx, phase, blobs, timeout_s=cfg.run.round_timeout_s)
            for site, blob in raw.items():
                if isinstance(blob, bytes):
                    recorder.ledger.add(round_idx, phase, site, "up", len(blob))
            replies, failed = _decode_replies(raw, server.max_reply_bytes(phase))
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


def run_federation(
    cfg: RunConfig,
    server: ServerHalf,
    transport: Transport,
    recorder: RunRecorder,
    evaluate: Evaluator,
    tokenizer: Any,
) -> dict[str, Any]:
    """Evaluate round 0, run ``cfg.num_rounds`` rounds, checkpoint, and write the summary."""
    if not recorder.rows:
        t0 = time.time()
        ev = evaluate(server.global_model(), True)
        if cfg.imv.every_rounds:
            ev.update(_probe_imv(cfg, server, tokenizer, transport))
        recorder.round_done({"round": 0, **ev, "wall_s": round(time.time() - t0, 3), "state_hash": server.state_hash()})
    last_ckpt = None
    for r in range(1, cfg.num_rounds + 1):
        t0 = time.time()
        metrics, rejected, attempts = run_round(cfg, server, transport, recorder, r)
        train_s = time.time() - t0
        row: dict[str, Any] = {"round": r, **metrics, "attempts": attempts, "train_wall_s": round(train_s, 3)}
        if rejected:
            row["rejected"] = rejected
        last = r == cfg.num_rounds
        if last or r % cfg.eval.every_rounds == 0:
            acc_every = cfg.eval.accuracy_every_rounds
            with_acc = last or (acc_every > 0 and r % acc_every == 0)
            row.update(evaluate(server.global_model(), with_acc))
        if cfg.imv.every_rounds and (last or r % cfg.imv.every_rounds == 0):
            row.update(_probe_imv(cfg, server, tokenizer, transport))
        row["state_hash"] = server.state_hash()
        row["wall_s"] = round(time.time() - t0, 3)
        recorder.round_done(row)
        if last or (cfg.run.checkpoint_every and r % cfg.run.checkpoint_every == 0):
            imv = {k: row[k] for k in ("imv", "imv_radius", "imv_base_loss", "imv_capped") if k in row}
            last_ckpt = recorder.checkpoint(
                server.global_model(), tokenizer, r, {"state_hash": server.state_hash(), **imv}
            )
    return recorder.finish({"checkpoint": str(last_ckpt) if last_ckpt else None})

"""The contract every registered algorithm meets, checked the same way for each (a new one gets it for free).

For every name in ``edgetune.algorithms.ALGORITHMS``, on the short recipe of ``tests/test_golden.py`` (3 sites,
the in-memory tiny Llama, 2 rounds, run in-process):

* **config**: every field of the algorithm's config section refuses a nonsense value (a negative count, NaN, an
  unknown choice) with a ``ValueError`` naming the field;
* **plan**: a site refuses a round message with a field missing, of the wrong type, empty, one byte short, one
  byte long, garbage or non-finite, also inside a nested payload (``ValueError`` with a message), and a refused
  message costs it nothing: afterwards the honest message gets a reply of the same size that moves the server
  to the same hash as an undisturbed site's;
* **replies**: the server rejects a reply broken the same ways, naming the site, without moving its state, and
  plans the retried round byte for byte again (``STILL_VALID`` lists mutations that leave a well-formed reply);
  a reply whose last 4 bytes became NaN is rejected and the honest sites' round commits with a finite model;
* **save/load**: ``save_state`` then ``load_state`` into a fresh server (built from the base weights, as a
  restart builds it) restores the state hash and the global model's weights, and plans the next round with
  payloads of the same sizes; the next round ends on the hash of an uninterrupted run;
* **determinism**: two federations with the same config and run name (separate folders) pass through the same
  state hash after every phase of 2 rounds, with messages of the same sizes both ways (contents may differ
  only where a payload is sealed with a fresh nonce: spsa's envelopes and replies);
* **learns**: the whole run through the real loop (evaluation, journal, state folders) lowers the held-out
  loss by at least 0.5% in 2 rounds (an algorithm that applies nothing would pass every other check);
* **bytes**: through the real round loop, every declared phase is exchanged, in order; the ledger holds
  exactly the encoded size of every message, both ways; honest replies fit ``max_reply_bytes`` and are all
  accepted; and the state depends only on what crossed the wire (a fresh server fed the recorded replies
  reaches the same hash).

The checks are plain functions (``check_*``) that raise ``AssertionError`` when the contract is broken;
``test_a_broken_algorithm_fails_its_check`` feeds them deliberately broken algorithms to show they can fail.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_golden import COMMON, NUM_SITES, RECIPES

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import ALGORITHMS, AlgorithmSpec
from edgetune.algorithms.base import RoundResult
from edgetune.build import build_server
from edgetune.comm import wire
from edgetune.comm.wire import Payload
from edgetune.federation import RoundFailed, run_round
from edgetune.models.load import clear_cache
from edgetune.models.params import sha256_tensors

MAX_BYTES = 1 << 30
RUN = "conformance"
"""Run folder name of every federation here: it keys every stream, so two federations of one check agree."""


def recipe(name: str) -> dict[str, Any]:
    """The flat config of the short recipe ``name`` runs here (``tests/test_golden.py`` pins its numerics)."""
    assert name in RECIPES, f"{name}: add its short recipe to RECIPES (and its hash to GOLDEN) in tests/test_golden.py"
    return {**COMMON, **RECIPES[name]}


class Federation:
    """An in-process federation of ``NUM_SITES`` sites built by the real build path (``inproc.build``)
    under its own cache folder (model, site state), so two of them share nothing but the run name."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.root = root
        self.cfg = cfgmod.from_run_config(recipe(name))
        # fresh site state (dppf's copies, deft's residuals, spsa's replicas) for this federation only; the
        # fixture in conftest.py restores the variable after the test
        os.environ["EDGETUNE_CACHE"] = str(root / "cache")
        self.run_dir = root / RUN
        self.server, self.transport, self.recorder, _evaluate, _tok = inproc.build(
            self.cfg, NUM_SITES, run_dir=self.run_dir
        )
        self.sites = self.transport.sites()

    @property
    def clients(self) -> dict[str, Any]:
        return self.transport.clients

    def ask(self, site: str, phase: str, payload: Payload) -> Payload:
        """One site answers one message, as the transport would deliver it (encoded, decoded)."""
        msg = wire.decode(wire.encode(payload), max_bytes=MAX_BYTES)
        reply, self.transport.states[site] = self.clients[site].step(phase, msg, self.transport.states[site])
        return wire.decode(wire.encode(reply), max_bytes=MAX_BYTES)

    def round(self, round_idx: int) -> list[tuple[str, dict[str, bytes], dict[str, bytes], str]]:
        """One honest round with every site; per phase: the encoded payloads, the encoded replies, the hash after."""
        trace = []
        for phase in self.server.phases:
            payloads = self.server.configure(round_idx, phase, self.sites)
            replies = {s: self.ask(s, phase, payloads[s]) for s in self.sites}
            result = self.server.aggregate(round_idx, phase, replies, min_sites=len(self.sites))
            assert result.committed and not result.rejected, (
                f"{self.name}: honest round {round_idx} phase {phase!r}: committed={result.committed}, "
                f"rejected {result.rejected}"
            )
            down = {s: wire.encode(p) for s, p in payloads.items()}
            up = {s: wire.encode(r) for s, r in replies.items()}
            trace.append((phase, down, up, self.server.state_hash()))
        return trace


def fresh_server(fed: Federation) -> Any:
    """A new server half of ``fed``'s run, built as a restarted server builds it (from the base weights)."""
    clear_cache()  # a restart loads the base model again; the cached one holds the trained weights
    server, _tok, _evaluate = build_server(fed.cfg, fed.run_dir, fed.sites)
    return server


def _weights(model: Any) -> str:
    """sha256 of every parameter of a model (what evaluation and checkpoints see)."""
    return sha256_tensors([p.detach() for p in model.parameters()])


def _encoded(payloads: dict[str, Payload]) -> dict[str, bytes]:
    return {s: wire.encode(p) for s, p in payloads.items()}


def _sizes(payloads: dict[str, Payload]) -> dict[str, int]:
    """Encoded size per site (content may differ where a payload is sealed with a fresh nonce: spsa)."""
    return {s: len(wire.encode(p)) for s, p in payloads.items()}


# ---- mutations ------------------------------------------------------------------------------------------

NAN_F32 = struct.pack("<f", float("nan"))


def _nested(value: Any) -> Payload | None:
    """The payload inside a bytes field, when the field is one (kavg's plan)."""
    if not isinstance(value, bytes):
        return None
    try:
        inner = wire.decode(value, max_bytes=len(value))
    except ValueError:
        return None
    return inner if isinstance(inner, dict) else None


def structural_mutations(payload: Payload, where: str = "") -> Iterator[tuple[str, Payload]]:
    """Every way of breaking a payload's structure a receiver must notice: a field missing, a field of another
    type, a bytes field empty, one byte short, one byte long or garbage, a float non-finite; inside nested
    payloads too."""
    for key in sorted(payload):
        value = payload[key]
        label = f"{where}{key}"
        yield f"{label} missing", {k: v for k, v in payload.items() if k != key}
        other: Any = "x" if not isinstance(value, str) else b"x"
        yield f"{label} as {type(other).__name__}", {**payload, key: other}
        if isinstance(value, bytes) and value:
            yield f"{label} empty", {**payload, key: b""}
            yield f"{label} one byte short", {**payload, key: value[:-1]}
            yield f"{label} one byte long", {**payload, key: value + b"\x00"}
            yield f"{label} garbage", {**payload, key: b"\xa5\x00garbage\xff" * 3}
        if isinstance(value, float):
            for bad in (math.nan, math.inf):
                yield f"{label} = {bad}", {**payload, key: bad}
        inner = _nested(value)
        if inner is not None:
            for sub_label, sub in structural_mutations(inner, where=f"{label}."):
                yield sub_label, {**payload, key: wire.encode(sub)}


STILL_VALID = {
    ("deft", "indices", "idx empty"): "a site sends at most k_p indices per partition (fewer is a valid reply)",
    ("deft", "indices", "idx one byte short"): "dropping a one-byte last gap leaves a valid list one index shorter",
}
"""(algorithm, phase, mutation) -> why that mutated reply is still a well-formed one, so the server may accept it."""


def nan_tail(payload: Payload) -> Payload:
    """Every non-empty bytes field with its last 4 bytes replaced by float32 NaN (an update gone bad)."""
    return {
        k: (v[:-4] + NAN_F32 if isinstance(v, bytes) and len(v) >= 4 and _nested(v) is None else v)
        for k, v in payload.items()
    }


# ---- the checks -----------------------------------------------------------------------------------------


def check_config_refuses_nonsense(name: str) -> None:
    """Every field of the algorithm's section refuses a negative count, NaN and an unknown choice, naming it."""
    section = getattr(cfgmod.RunConfig(), name, None)
    assert dataclasses.is_dataclass(section), f"{name}: RunConfig has no [{name}] section"
    checked = 0
    for field in dataclasses.fields(section):
        default = getattr(section, field.name)
        if isinstance(default, bool):
            continue
        bad = {int: -1, float: math.nan, str: "no-such-choice"}.get(type(default))
        if bad is None:
            continue
        flat = {**recipe(name), f"{name}.{field.name}": bad}
        try:
            cfgmod.from_run_config(flat)
        except ValueError as err:
            assert field.name in str(err), f"{name}.{field.name} = {bad!r} refused without naming it: {err}"
        else:
            raise AssertionError(f"{name}.{field.name} = {bad!r} was accepted")
        checked += 1
    assert checked, f"{name}: its section has no field to check"


def check_sites_refuse_bad_messages(name: str, root: Path) -> None:
    """A site refuses every structurally broken round message with a ``ValueError``; refused messages cost it
    nothing (afterwards the honest message gets a reply of an undisturbed site's size and effect)."""
    reference = Federation(name, root / "reference").round(1)
    fed = Federation(name, root / "probed")
    site = fed.sites[0]
    for phase, _down, up, want_hash in reference:
        payloads = fed.server.configure(1, phase, fed.sites)
        for label, bad in structural_mutations(payloads[site]):
            state = fed.transport.states[site]
            try:
                fed.clients[site].step(phase, wire.decode(wire.encode(bad), max_bytes=MAX_BYTES), state)
            except ValueError as err:
                assert str(err), f"{name} {phase}: {label}: refused with an empty message"
            except Exception as err:  # Flower's client handler turns only ValueError into an error reply
                raise AssertionError(
                    f"{name} phase {phase!r}: a round message with {label} raised {type(err).__name__}, not "
                    f"ValueError: {err}"
                ) from err
            else:
                raise AssertionError(f"{name} phase {phase!r}: a site accepted a round message with {label}")
        replies = {s: fed.ask(s, phase, payloads[s]) for s in fed.sites}
        result = fed.server.aggregate(1, phase, replies, min_sites=len(fed.sites))
        assert result.committed and not result.rejected, f"{name} phase {phase!r}: {result.rejected}"
        assert _sizes(replies) == {s: len(b) for s, b in up.items()} and fed.server.state_hash() == want_hash, (
            f"{name} phase {phase!r}: after refusing bad messages, the sites answer otherwise than undisturbed ones"
        )


def check_server_rejects_bad_replies(name: str, root: Path) -> None:
    """The server rejects every structurally broken reply, naming the site, without moving its state; the retried
    round is planned byte for byte again; a NaN-tailed reply is rejected and the others' round commits, finite."""
    fed = Federation(name, root / "fed")
    server, site = fed.server, fed.sites[0]
    honest: list[tuple[str, dict[str, Payload], dict[str, Payload]]] = []  # phase, payloads, replies so far
    problems: list[str] = []

    def replay_earlier_phases() -> None:
        """A round without quorum is retried from its first phase (federation.run_round)."""
        for phase, payloads, replies in honest:
            again = server.configure(1, phase, fed.sites)
            assert _encoded(again) == _encoded(payloads), f"{name}: the retried round's {phase!r} payloads differ"
            assert server.aggregate(1, phase, replies, min_sites=len(fed.sites)).committed

    for phase in server.phases:
        payloads = server.configure(1, phase, fed.sites)
        replies = {s: fed.ask(s, phase, payloads[s]) for s in fed.sites}
        for label, bad in structural_mutations(replies[site]):
            before = server.state_hash()
            try:
                # alone against a quorum of all sites: even an accepted reply cannot commit the round
                result = server.aggregate(1, phase, {site: bad}, min_sites=len(fed.sites))
            except Exception as err:
                problems.append(f"phase {phase!r}: a reply with {label} raised {err!r}")
                continue
            if (site not in result.rejected or not result.rejected[site]) and (name, phase, label) not in STILL_VALID:
                problems.append(f"phase {phase!r}: a reply with {label} was not rejected")
            if result.committed or server.state_hash() != before:
                raise AssertionError(f"{name} phase {phase!r}: a reply with {label} committed or moved the state")
            replay_earlier_phases()
            again = server.configure(1, phase, fed.sites)
            assert _encoded(again) == _encoded(payloads), f"{name}: the retried round's {phase!r} payloads differ"
        honest.append((phase, payloads, replies))
        if phase != server.phases[-1]:
            assert server.aggregate(1, phase, replies, min_sites=len(fed.sites)).committed
    assert not problems, f"{name}: " + "; ".join(problems)
    # the last phase: one site's update gone bad among honest ones; the round goes on without it
    phase, _payloads, replies = honest[-1]
    result = server.aggregate(1, phase, {**replies, site: nan_tail(replies[site])}, min_sites=1)
    assert result.committed, f"{name}: the honest sites' round did not commit beside a NaN-tailed reply"
    finite = all(bool(torch.isfinite(p).all()) for p in server.global_model().parameters())
    assert finite, f"{name}: the model is not finite after a round with a NaN-tailed reply"
    assert site in result.rejected or (name, phase, "nan tail") in STILL_VALID, (
        f"{name} phase {phase!r}: a reply whose last 4 bytes are NaN was accepted"
    )


def check_save_load_round_trip(name: str, root: Path) -> None:
    """``save_state`` + ``load_state`` into a fresh server restores the hash and the model's weights, plans the
    next round with payloads of the original's sizes, and the next round ends where an uninterrupted run ends."""
    uninterrupted = Federation(name, root / "a")
    uninterrupted.round(1)
    want = uninterrupted.round(2)[-1][3]

    fed = Federation(name, root / "b")
    fed.round(1)
    folder = root / "state"
    fed.server.save_state(folder, 1)
    saved_hash = fed.server.state_hash()
    restored = fresh_server(fed)
    assert restored.state_hash() != saved_hash, "the fresh server already holds the trained state"
    assert restored.load_state(folder) == 1, f"{name}: load_state does not return the committed round"
    assert restored.state_hash() == saved_hash, f"{name}: load_state does not restore the state hash"
    assert _weights(restored.global_model()) == _weights(fed.server.global_model()), (
        f"{name}: after load_state the global model's weights differ from the saved server's"
    )
    first = fed.server.phases[0]
    planned = _sizes(fed.server.configure(2, first, fed.sites))
    assert _sizes(restored.configure(2, first, fed.sites)) == planned, (
        f"{name}: the restored server plans round 2 otherwise than the original"
    )
    fed.server = restored
    fed.round(2)
    assert restored.state_hash() == want, f"{name}: round 2 after save/load ends on another hash than without"


def check_deterministic(name: str, root: Path) -> None:
    """Two federations, same config and run name: the same hash after every phase, messages of the same sizes."""
    traces = []
    for i in (1, 2):  # one after the other: building a federation resets the process's model cache
        fed = Federation(name, root / f"run{i}")
        traces.append([*fed.round(1), *fed.round(2)])
    a, b = traces
    for (phase, down_a, up_a, hash_a), (_p, down_b, up_b, hash_b) in zip(a, b, strict=True):
        assert {s: len(x) for s, x in down_a.items()} == {s: len(x) for s, x in down_b.items()}, (
            f"{name} phase {phase!r}: downlink sizes differ between identical runs"
        )
        assert {s: len(x) for s, x in up_a.items()} == {s: len(x) for s, x in up_b.items()}, (
            f"{name} phase {phase!r}: reply sizes differ between identical runs"
        )
        assert hash_a == hash_b, f"{name} phase {phase!r}: state hashes differ between identical runs"


class Tap:
    """Wraps the in-process transport; records every exchange as the loop encoded it."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, str, dict[str, bytes], dict[str, Any]]] = []

    def sites(self) -> list[str]:
        return self.inner.sites()

    def drain_stale(self) -> dict[str, str]:
        drain = getattr(self.inner, "drain_stale", None)  # part of the Transport protocol since issue 17
        return drain() if drain is not None else {}

    def exchange(self, round_idx: int, phase: str, blobs: dict[str, bytes], *, timeout_s: float) -> dict[str, Any]:
        raw = self.inner.exchange(round_idx, phase, blobs, timeout_s=timeout_s)
        self.calls.append((round_idx, phase, dict(blobs), dict(raw)))
        return raw


def check_bytes_recorded(name: str, root: Path) -> None:
    """Through the real round loop: every declared phase exchanged in order, the ledger equal to the encoded
    sizes both ways, honest replies within ``max_reply_bytes`` and all accepted, and the state a function of
    the recorded replies alone."""
    fed = Federation(name, root / "fed")
    tap = Tap(fed.transport)
    try:
        _metrics, rejected, attempts = run_round(fed.cfg, fed.server, tap, fed.recorder, 1)
    except RoundFailed as err:
        raise AssertionError(f"{name}: honest sites rejected: {err}") from err
    assert attempts == 1 and not rejected, f"{name}: honest sites rejected: {rejected}"
    assert [phase for _r, phase, _d, _u in tap.calls] == list(fed.server.phases), (
        f"{name}: exchanged {[c[1] for c in tap.calls]}, declared {fed.server.phases}"
    )
    want = []
    for round_idx, phase, down, up in tap.calls:
        for site, blob in down.items():
            want.append((round_idx, phase, site, "down", len(blob)))
        for site, blob in up.items():
            assert isinstance(blob, bytes), f"{name} phase {phase!r}: {site} failed: {blob}"
            assert len(blob) <= fed.server.max_reply_bytes(phase), (
                f"{name} phase {phase!r}: an honest reply of {len(blob)} bytes exceeds max_reply_bytes"
            )
            want.append((round_idx, phase, site, "up", len(blob)))
    got = [(r.round_idx, r.phase, r.site_id, r.direction, r.num_bytes) for r in fed.recorder.ledger.rows]
    assert sorted(got) == sorted(want), f"{name}: the ledger does not match the encoded messages"
    # what crossed the wire is all that moved the state: a fresh server fed the recorded replies agrees
    replay = fresh_server(fed)
    for round_idx, phase, _down, up in tap.calls:
        replay.configure(round_idx, phase, fed.sites)
        replies = {s: wire.decode(blob, max_bytes=MAX_BYTES) for s, blob in up.items()}
        assert replay.aggregate(round_idx, phase, replies, min_sites=len(fed.sites)).committed
    assert replay.state_hash() == fed.server.state_hash(), (
        f"{name}: a server fed the recorded replies ends elsewhere: the state depends on more than the wire"
    )


def check_learns(name: str, root: Path) -> None:
    """The whole run through the real loop (``inproc.run``: evaluation, journal, state folders; sites on their own
    model copies) lowers the held-out loss by at least 0.5% in 2 rounds: an algorithm that applies nothing
    fails."""
    os.environ["EDGETUNE_CACHE"] = str(root / "cache")
    # every site on its own model copy (as in a deployment): the server's model moves only by what it applies
    summary = inproc.run(cfgmod.from_run_config(recipe(name)), NUM_SITES, run_dir=root / RUN, separate_replicas=True)
    first, last = summary["heldout_loss_first"], summary["heldout_loss_last"]
    assert summary["rounds_completed"] == COMMON["num_rounds"]
    assert last < 0.995 * first, f"{name}: held-out loss {first:.4f} -> {last:.4f} in {COMMON['num_rounds']} rounds"


CHECKS: dict[str, Callable[[str, Path], None]] = {
    "learns": check_learns,
    "config": lambda name, _root: check_config_refuses_nonsense(name),
    "plan": check_sites_refuse_bad_messages,
    "replies": check_server_rejects_bad_replies,
    "save-load": check_save_load_round_trip,
    "determinism": check_deterministic,
    "bytes": check_bytes_recorded,
}


@pytest.mark.parametrize("check", sorted(CHECKS))
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_algorithm_meets_the_contract(name, check, tmp_path):
    """Every registered algorithm passes every check (see the module docstring)."""
    CHECKS[check](name, tmp_path)


# ---- the checks can fail ----------------------------------------------------------------------------


def forgetful(spec: AlgorithmSpec) -> AlgorithmSpec:
    """``load_state`` returns the committed round but restores nothing."""

    class Forgetful(spec.server_cls):
        def save_state(self, folder: Path, committed_round: int) -> None:
            super().save_state(folder, committed_round)
            (folder / "round.txt").write_text(str(committed_round))

        def load_state(self, folder: Path) -> int:
            return int((folder / "round.txt").read_text())

    return AlgorithmSpec(spec.name, Forgetful, spec.client_cls)


def lax(spec: AlgorithmSpec) -> AlgorithmSpec:
    """The server reports no rejections (as if it had not screened the replies)."""

    class Lax(spec.server_cls):
        def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> Any:
            result = super().aggregate(round_idx, phase, replies, min_sites=min_sites)
            return dataclasses.replace(result, rejected={})

    return AlgorithmSpec(spec.name, Lax, spec.client_cls)


def trusting(spec: AlgorithmSpec) -> AlgorithmSpec:
    """A site that swallows a message it cannot read and answers with an empty reply."""

    class Trusting(spec.client_cls):
        def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
            try:
                return super().step(phase, msg, state)
            except ValueError:
                return {}, state

    return AlgorithmSpec(spec.name, spec.server_cls, Trusting)


def tight(spec: AlgorithmSpec) -> AlgorithmSpec:
    """``max_reply_bytes`` smaller than an honest reply (every site would be cut off on the link)."""

    class Tight(spec.server_cls):
        def max_reply_bytes(self, phase: str) -> int:
            return 8

    return AlgorithmSpec(spec.name, Tight, spec.client_cls)


def idle(spec: AlgorithmSpec) -> AlgorithmSpec:
    """The server accepts every reply and applies none of them."""

    class Idle(spec.server_cls):
        def aggregate(self, round_idx: int, phase: str, replies: dict[str, Payload], *, min_sites: int) -> Any:
            return RoundResult(True, {"num_accepted": float(len(replies))}, {}, tuple(sorted(replies)))

    return AlgorithmSpec(spec.name, Idle, spec.client_cls)


BROKEN: dict[str, tuple[str, Callable[[AlgorithmSpec], AlgorithmSpec], str, str]] = {
    "kavg-forgetful-load": ("kavg", forgetful, "save-load", "load_state does not restore the state hash"),
    "spsa-forgetful-load": ("spsa", forgetful, "save-load", "load_state does not restore the state hash"),
    "kavg-lax-server": ("kavg", lax, "replies", "was not rejected"),
    "kavg-trusting-site": ("kavg", trusting, "plan", "a site accepted a round message with"),
    "kavg-tight-reply-limit": ("kavg", tight, "bytes", "honest sites rejected"),
    "kavg-idle-server": ("kavg", idle, "learns", "held-out loss"),
}
"""Deliberately broken algorithm -> (registered algorithm it breaks, how, the check that must fail, its message)."""


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_broken_algorithm_fails_its_check(broken, tmp_path, monkeypatch):
    """The check functions the suite runs fail, with their message, for an algorithm broken in their respect
    (registered under the real name, so the real build path picks it up)."""
    # Prepare
    name, breaks, check, message = BROKEN[broken]
    monkeypatch.setitem(ALGORITHMS, name, breaks(ALGORITHMS[name]))

    # Execute / Assert
    with pytest.raises(AssertionError, match=message):
        CHECKS[check](name, tmp_path)

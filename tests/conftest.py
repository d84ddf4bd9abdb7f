"""Shared fixtures: a tiny, deterministic spsa configuration and in-process federations."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and OpenMP threads spin badly when the CPU is
# shared; tests that run the real model raise it themselves.
torch.set_num_threads(1)


def tiny_flat(**overrides):
    """Flat config of a small tiny-model spsa run (deterministic secrets)."""
    flat = {
        "model.path": "tiny",
        "model.trainable": "all",
        "num_rounds": 3,
        "crypto.deterministic_secrets": True,
        "data.demo_facts": 4,
        "data.batch_size": 4,
        "eval.num_examples": 8,
        "eval.batch_size": 8,
        "eval.max_new_tokens": 4,
        "spsa.lr": 1e-3,
        "spsa.num_steps": 2,
        "run.min_sites": 1,
    }
    flat.update(overrides)
    return flat


class RewriteCodes:
    """An spsa site that computes its honest reply (so it stays in sync) and sends ``rewrite(codes)`` instead:
    the reply is opened with the round's reply key, its codes replaced, and sealed again."""

    def __init__(self, honest, rewrite):
        self.honest, self.ctx, self.rewrite = honest, honest.ctx, rewrite

    def step(self, phase, msg, state):
        from edgetune.comm import wire
        from edgetune.crypto import envelope
        from edgetune.crypto.envelope import ReplayGuard

        reply, state = self.honest.step(phase, msg, state)
        opened, _ = envelope.open_envelope(
            msg["env"], self.ctx.site_keys, run_id=msg["run"], guard=ReplayGuard(), now=0
        )
        where = {"run_id": msg["run"], "round_idx": opened.round_idx, "site_id": self.ctx.site_id}
        inner = wire.decode(
            envelope.open_reply(opened.reply_key, blob=reply["blob"], max_bytes=1 << 20, **where), max_bytes=1 << 20
        )
        inner["codes"] = self.rewrite(inner["codes"])
        return {"blob": envelope.seal_reply(opened.reply_key, payload=wire.encode(inner), **where)}, state


def session_cache(tmp_path_factory) -> str:
    """The test session's cache folder (model conversions, site state, scratch files), not ~/.cache.
    Each pytest-xdist worker has its own: site state folders are keyed by run id, and tests in two
    workers may use the same run id at the same time (seen: one worker's run removed another's state)."""
    return os.environ.get("EDGETUNE_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "edgetune-cache")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Model conversions and scratch files go to the session's cache folder, not ~/.cache."""
    monkeypatch.setenv("EDGETUNE_CACHE", session_cache(tmp_path_factory))


def pytest_collection_modifyitems(config, items):
    """Files with slow tests first, each file's tests kept together: under pytest-xdist (``make test``)
    the long files then start early and the many short ones fill the workers' ends, instead of one
    long file running alone at the end."""

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    slow = {module(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: module(item) not in slow)  # a stable sort: the order within each group stays

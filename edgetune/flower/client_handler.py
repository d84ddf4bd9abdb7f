"""ClientApp side: who this node is, its client half (cached per process), one call per message.

Simulation nodes know only ``partition-id``/``num-partitions``: they are ``site-<partition-id>``
and find their key kit under the folder the server names in ``query.hello`` (all simulated
sites share one file system), or, with ``run.portable_sites`` (a Ray cluster), are handed the kit
in the hello exchange and carry it and their state in Flower's Context (``flower/portable.py``).
Deployment nodes are started by ``edgetune site`` with ``site-id``, ``kit-dir`` and ``data-path``
in their node config and never take a kit or a kit path from the server.

A site's per-run state (e.g. the envelope replay guard) lives in ``context.state`` as a
ConfigRecord, so Flower keeps it between rounds.

When the node config names a ``site-host`` socket (``edgetune site`` starts one; see
``edgetune/sitehost.py``), the step runs there, on the model the host keeps loaded, and this
process (a fresh ``flwr-clientapp`` per message) never imports torch: the heavy imports below are
deferred to the in-process path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, RecordDict

from edgetune import faults
from edgetune.bundle import check_version
from edgetune.comm import wire
from edgetune.flower import portable, presence
from edgetune.flower.messages import from_content, to_content

if TYPE_CHECKING:
    from edgetune.algorithms.base import ClientHalf

STATE_KEY = "edgetune"
MAX_DOWN_BYTES = 1 << 30
ERROR_TEXT_CHARS = 1000
"""A site's error reply keeps this many characters: at most 4 bytes each in UTF-8, so with its
framing it fits the 4096 bytes the server reads of an error (``federation.ERROR_PAYLOAD_BYTES``)."""

_CLIENTS: dict[tuple[int, str], ClientHalf] = {}
_WORKDIR: list[Path] = []


def identity(context: Context, kit_root: str = "") -> dict[str, Any]:
    """Site id, index, count, kit folder and data path of this node."""
    nc = context.node_config
    if "site-id" in nc:
        site = str(nc["site-id"])
        kit = str(nc.get("kit-dir", ""))
        if not kit:
            raise ValueError("node config has site-id but no kit-dir (start sites with `edgetune site`)")
        return {
            "site": site,
            "index": int(nc.get("site-index", 0)),
            "num": int(nc.get("num-sites", 1)),
            "kit": kit,
            "data": str(nc.get("data-path", "")),
        }
    if "partition-id" not in nc:
        raise ValueError("node config has neither site-id (deployment) nor partition-id (simulation)")
    index = int(nc["partition-id"])
    site = f"site-{index}"  # build.site_name, without importing torch
    kit = str(Path(kit_root) / site) if kit_root else ""
    return {"site": site, "index": index, "num": int(nc["num-partitions"]), "kit": kit, "data": ""}


def hello(msg: Message, context: Context) -> Message:
    """Answer ``query.hello``: this node's site id and, for the server's challenge, a proof made with the
    site's own agreement key (``crypto/identity.py``); remember the simulation kit root.

    A portable simulated site (``run.portable_sites``) answers the first hello with its site id only;
    the server's second hello carries the site's kit (``kit_names``/``kit_files``), which the node
    keeps in its Context and proves with. A deployed site refuses a kit from the server.
    """
    from edgetune.crypto import identity as proof_of
    from edgetune.crypto.keys import load_site

    query = msg.content["hello"]
    kit_root = str(query.get("kit_root", ""))
    me = identity(context, kit_root)
    check_version(str(msg.content["hello"].get("edgetune", "")), me["site"])  # the FAB runs this site's edgetune
    if "kit_names" in query:
        if not _portable(context):
            raise ValueError(f"site {me['site']}: the server sent a key kit; this site keeps its own and refuses it")
        context.state[portable.KIT_KEY] = portable.record(query.get("kit_names"), query.get("kit_files"))
        me["kit"] = str(portable.kit_folder(context, me["site"]))
    else:
        context.state["edgetune-hello"] = ConfigRecord({"kit_root": kit_root})
    answer: dict[str, Any] = {"site": me["site"]}
    challenge = query.get("challenge")
    if isinstance(challenge, bytes) and me["kit"]:
        keys = load_site(Path(me["kit"]))
        if keys.site_id != me["site"]:
            raise ValueError(f"kit {me['kit']} is for site {keys.site_id!r}, this node is {me['site']!r}")
        answer["proof"] = proof_of.prove(keys, challenge, context.node_id)
    return Message(RecordDict({"hello": ConfigRecord(answer)}), reply_to=msg)


def bye(msg: Message, context: Context) -> Message:
    """Answer ``query.bye`` (the server committed its last round): a site started with
    ``edgetune site --leave-after-run`` records it, and its supervisor disconnects (``flower/presence.py``).
    """
    with presence.handling(context.node_config):
        leaving = presence.note_run_ended(context.node_config, context.run_id)
    return Message(RecordDict({"bye": ConfigRecord({"leaving": leaving})}), reply_to=msg)


def require_local_kit(me: dict[str, Any]) -> None:
    """A simulated site reads its key kit from the server's run folder: refuse clearly when that
    folder is not on this machine (a Ray cluster without portable sites, docs/many-machines.md).
    """
    if me["kit"] and not Path(me["kit"]).is_dir():
        raise ValueError(
            f"simulated site {me['site']}: its key kit {me['kit']} (in the server's run folder) is not on this "
            "machine. On a Ray cluster run `edgetune simulate --ray-address HOST:PORT`, which makes sites portable "
            "(run.portable_sites: kits and state travel with the run; docs/many-machines.md)."
        )


NODE_OVERRIDES = {"device": "model.device", "model-path": "model.path", "quantize": "model.quantize"}
"""Node config keys a site sets for itself (``edgetune site --device/--model/--quantize``) -> run config keys.
A site's own model copy is still checked against the run's ``model.sha256``."""


def _run_config(context: Context, cuda_visible: bool | None = None) -> dict[str, Any]:
    """The run config as this node applies it: its own device(s), model copy and quantisation in
    deployment (``NODE_OVERRIDES``); in simulation the GPU Flower's backend assigned to it
    (``run.gpus_per_site``), or the CPU when none was.
    """
    flat = dict(context.run_config)
    for node_key, run_key in NODE_OVERRIDES.items():
        if node_key in context.node_config:
            flat[run_key] = str(context.node_config[node_key])
    if "device" not in context.node_config and "site-id" not in context.node_config:  # a simulated site
        from edgetune.models.load import simulated_site_device

        if cuda_visible is None:
            import torch

            cuda_visible = torch.cuda.is_available()
        gpus = float(flat.get("run.gpus_per_site", 0.0))
        flat["model.device"] = simulated_site_device(str(flat.get("model.device", "auto")), gpus, cuda_visible)
    return flat


def _client(context: Context) -> ClientHalf:
    from edgetune import config as cfgmod
    from edgetune.build import build_client, process_workdir

    kit_root = ""
    if "edgetune-hello" in context.state:
        kit_root = str(context.state.config_records["edgetune-hello"]["kit_root"])
    me = identity(context, kit_root)
    key = (context.run_id, me["site"])
    if key not in _CLIENTS:
        state_dir = None
        if _portable(context):
            me["kit"] = str(portable.kit_folder(context, me["site"]))
            state_dir = portable.state_folder(context, me["site"])
        elif "site-id" not in context.node_config:
            require_local_kit(me)
        cfg = cfgmod.from_run_config(_run_config(context))
        if not _WORKDIR:
            _WORKDIR.append(process_workdir(cfg))
        _CLIENTS[key] = build_client(
            cfg,
            me["site"],
            me["index"],
            me["num"],
            Path(me["kit"]),
            workdir=_WORKDIR[0],
            data_path=me["data"],
            state_dir=state_dir,
        )
    return _CLIENTS[key]


def _portable(context: Context) -> bool:
    """A simulated site whose kit and state travel in its Context (``flower/portable.py``)."""
    return "site-id" not in context.node_config and portable.enabled(context.run_config)


def handle(msg: Message, context: Context, phase: str) -> Message:
    """Run one phase for this site: decode, ``client.step``, encode; ``ValueError``s (bad
    envelopes, replay gaps, bad input) become an ``error`` payload the server logs.
    """
    with presence.handling(context.node_config):
        return _handle(msg, context, phase)


def _handle(msg: Message, context: Context, phase: str) -> Message:
    state: dict[str, Any] = {}
    if STATE_KEY in context.state:
        state = dict(context.state.config_records[STATE_KEY])
    try:
        payload = wire.decode(from_content(msg.content, max_bytes=MAX_DOWN_BYTES), max_bytes=MAX_DOWN_BYTES)
        if "site-host" in context.node_config:
            reply, state = _on_site_host(context, phase, payload, state)
        elif _portable(context):
            site = identity(context)["site"]
            portable.load_state(context, site)  # this actor may not have run the site's last message
            try:
                reply, state = _client(context).step(phase, payload, state)
            finally:
                portable.save_state(context, site)
        else:
            reply, state = _client(context).step(phase, payload, state)
        group = msg.metadata.group_id
        faults.point("site-before-reply", int(group.split("-")[-1]) if group.startswith("round-") else 0)
    except ValueError as err:
        reply = {"error": f"{type(err).__name__}: {err}"[:ERROR_TEXT_CHARS]}
    context.state[STATE_KEY] = ConfigRecord(state)
    return Message(to_content(wire.encode(reply)), reply_to=msg)


def _on_site_host(
    context: Context, phase: str, payload: dict[str, Any], state: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run the step on this site's host process (model kept loaded); its ValueErrors come back as such."""
    from edgetune import sitehost

    me = identity(context)
    flat = _run_config(context)
    answer = sitehost.request(
        Path(str(context.node_config["site-host"])),
        {
            "cfg": json.dumps(flat, sort_keys=True),
            "run": str(context.run_id),
            "site": me["site"],
            "index": me["index"],
            "num": me["num"],
            "kit": me["kit"],
            "data": me["data"],
            "phase": phase,
            "payload": wire.encode(payload),
            "state": wire.encode(state),
        },
        timeout_s=float(flat.get("run.round_timeout_s", 600.0)),  # the server waits no longer either
    )
    if "error" in answer:
        raise ValueError(str(answer["error"]))
    if "crash" in answer:
        raise sitehost.SiteHostError(f"site host crashed: {answer['crash']}")
    reply = wire.decode(answer["reply"], max_bytes=MAX_DOWN_BYTES)
    return reply, wire.decode(answer["state"], max_bytes=MAX_DOWN_BYTES)

"""The real embedded model: GGUF conversion, an spsa round with separate replicas, the checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_flat

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.algorithms import spsa
from edgetune.federation import run_federation
from edgetune.models.folders import smollm2_folder
from edgetune.models.params import sha256_tensors

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_converted_smollm2_is_a_plain_fp32_folder():
    """The GGUF is converted once into a safetensors folder with no GGUF quantization entry."""
    folder = smollm2_folder()
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama"
    assert (folder / "model.safetensors").stat().st_size > 500_000_000  # 134.5M fp32 weights
    assert smollm2_folder() == folder  # second call reuses the cache


def test_spsa_round_on_smollm2_keeps_sites_bitwise_in_sync(tmp_path):
    """Two SmolLM2 sites with their own copies replay to the server's exact state; each uplink is
    K*P + 88 bytes; the checkpoint reloads with transformers and hashes to the run's state."""
    from transformers import AutoModelForCausalLM

    flat = tiny_flat(
        **{
            "model.path": "smollm2",
            "model.trainable": "q_proj,v_proj",
            "num_rounds": 2,
            "spsa.num_steps": 1,
            "spsa.lr": 1e-4,
            "data.batch_size": 2,
            "eval.num_examples": 4,
            "eval.batch_size": 4,
            "eval.max_new_tokens": 4,
            "data.demo_facts": 2,
        }
    )
    cfg = cfgmod.from_run_config(flat)
    server, transport, recorder, evaluate, tok = inproc.build(cfg, 2, run_dir=tmp_path / "run", separate_replicas=True)
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    assert summary["rounds_completed"] == 2
    assert recorder.ledger.per_site(round_idx=2, direction="up") == {"site-0": 1 + 88, "site-1": 1 + 88}
    rows = [json.loads(line) for line in (recorder.dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("num_accepted") == 2 for r in rows[1:])
    # round 2's replies proved both sites held the server's round-2 start state; check it directly too
    for client in transport.clients.values():
        rep = spsa.replica_for(
            client.ctx.model, server.run_id, client.ctx.workdir, "auto", client.ctx.replica_namespace
        )
        assert rep.applied == 1 and rep.hash == rows[1]["state_hash"]
    ckpt = recorder.dir / "checkpoints" / "round-0002"
    model = AutoModelForCausalLM.from_pretrained(ckpt, local_files_only=True, dtype=torch.float32)
    params = dict(model.named_parameters())
    trained = [params[e.name].data for e in server.replica.manifest]
    assert sha256_tensors(trained) == rows[-1]["state_hash"]


def test_label_head_on_smollm2_learns_the_triage_categories_and_its_checkpoint_loads_untied(tmp_path):
    """The demo's space on the real model, shortened: one site, three rounds of 60 local steps. The held-out
    choice loss falls; the checkpoint loads with transformers alone (SmolLM2 ties its head to the input
    embeddings: the saved head is untied, the embeddings keep the base weights) and scores like the server."""
    from transformers import AutoModelForCausalLM

    from edgetune.models.labelhead import label_head_of

    flat = tiny_flat(
        **{
            "model.path": "smollm2", "model.trainable": "label-head", "data.source": "triage",
            "data.batch_size": 120, "data.max_length": 128, "num_rounds": 3,
            "spsa.objective": "choices", "spsa.difference": "forward", "spsa.num_steps": 60, "spsa.num_probes": 8,
            "spsa.lr": 0.0015, "spsa.eps": 2.0**-10, "eval.num_examples": 16, "eval.batch_size": 16,
            "eval.every_rounds": 3,
        }
    )  # fmt: skip
    cfg = cfgmod.from_run_config(flat)
    server, transport, recorder, evaluate, tok = inproc.build(cfg, 1, run_dir=tmp_path / "run", separate_replicas=True)
    summary = run_federation(cfg, server, transport, recorder, evaluate, tok)
    assert summary["rounds_completed"] == 3
    assert summary["choice_loss_last"] < summary["choice_loss_first"] - 0.5, summary
    assert recorder.ledger.per_site(round_idx=3, direction="up") == {"site-0": 480 + spsa.reply_overhead_bytes(480)}
    model = server.replica.model
    assert label_head_of(model) is not None and model.config.tie_word_embeddings
    loaded = AutoModelForCausalLM.from_pretrained(recorder.dir / "checkpoints" / "round-0003", local_files_only=True)
    assert not loaded.config.tie_word_embeddings
    x = tok("Fault report from the plant: the pump whines.\nWhich category?", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, model(**x).logits, atol=1e-4)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)

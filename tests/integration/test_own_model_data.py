"""Your model, your data: federations from recipes that name a model by id in a local Hugging Face cache and
read chat messages from a `datasets` folder, or parquet through a column mapping; and a site whose own copy of
the model differs from the server's is refused through the same node-config path a deployed site takes."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from flwr.app import Context, RecordDict
from hf_fixtures import put_in_hf_cache, save_tiny_model

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.build import flower_partitioner
from edgetune.crypto import keys as keymod
from edgetune.data.demo import demo_heldout, demo_sites
from edgetune.data.prompts import TokenizedSet
from edgetune.data.sources import heldout_examples, site_examples
from edgetune.flower import client_handler
from edgetune.models.fingerprint import folder_fingerprint
from edgetune.models.folders import model_folder
from edgetune.models.load import load_model

SYSTEM = "You are the maintenance desk of the Nagoya press line. Quote the procedure number."


def _chats(rows, per_chat: int = 2):
    """Demo facts as multi-turn chats: each conversation asks ``per_chat`` questions in turn."""
    out = []
    for i in range(0, len(rows) - per_chat + 1, per_chat):
        messages = []
        for row in rows[i : i + per_chat]:
            messages += [
                {"role": "user", "content": row["instruction"]},
                {"role": "assistant", "content": row["response"]},
            ]
        out.append({"messages": messages, "site": rows[i]["site"]})
    return out


def _recipe(path, text: str):
    path.write_text(text)
    return cfgmod.from_run_config(cfgmod.load_recipe(path))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_model_by_id_from_the_hf_cache_with_chat_data_from_a_datasets_folder(tmp_path, hf_cache):
    """A lowrank federation (gradient checkpointing, accumulation, cosine lr) from a recipe naming the model
    by id (HF cache layout), chat messages in a save_to_disk folder and a custom system prompt: it completes,
    held-out loss falls, both sites' copies pass the pinned fingerprint, the system prompt is in the tokens
    the model sees, and the adapter checkpoint loads on the cached base with peft."""
    # Prepare
    source = save_tiny_model(tmp_path / "export")
    put_in_hf_cache(hf_cache, "acme/tiny-chat", source)
    sites = demo_sites(2, facts_per_site=6)
    train = [row for s in sites for row in s.train]
    Dataset.from_list(_chats(train)).save_to_disk(str(tmp_path / "chats"))
    heldout = [{"messages": c["messages"][:2], "site": c["site"]} for c in _chats(demo_heldout(2, facts_per_site=6), 1)]
    Dataset.from_list(heldout).save_to_disk(str(tmp_path / "chats-eval"))
    cfg = _recipe(
        tmp_path / "recipe.toml",
        f"""
algorithm = "lowrank"
num_rounds = 3
[run]
num_sites = 2
[model]
path = "acme/tiny-chat"
sha256 = "{folder_fingerprint(source)}"
trainable = "lora"
lora_rank = 4
lora_alpha = 8.0
gradient_checkpointing = true
[data]
source = "file"
path = "{tmp_path / "chats"}"
eval_path = "{tmp_path / "chats-eval"}"
partition = "natural"
partition_by = "site"
system_prompt = "{SYSTEM}"
max_length = 512
batch_size = 4
[eval]
num_examples = 16
max_new_tokens = 8
[kavg]
optimizer = "adamw"
lr = 0.01
local_steps = 2
lr_schedule = "cosine:0.5"
grad_accum_steps = 2
""",
    )

    # Execute
    summary = inproc.run(cfg, 2, run_dir=tmp_path / "run")

    # Assert
    assert model_folder(cfg.model).is_relative_to(hf_cache)
    assert summary["rounds_completed"] == 3
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"]
    site0 = site_examples(cfg, 0, 2, partitioner=flower_partitioner)
    assert site0 and all("messages" in ex and ex["system"] == SYSTEM for ex in site0)
    model, tok = load_model(cfg.model)
    data = TokenizedSet(tok, heldout_examples(cfg, 2)[:1], 512)
    assert f"<|im_start|>system\n{SYSTEM}<|im_end|>" in tok.decode(data.input_ids[0])
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = tmp_path / "run" / "checkpoints" / "round-0003"
    assert (ckpt / "adapter_config.json").is_file()
    # huggingface_hub reads HF_HUB_CACHE when imported, before this test set it: name the cache
    base = AutoModelForCausalLM.from_pretrained("acme/tiny-chat", cache_dir=hf_cache, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(ckpt))


def test_parquet_with_column_mapping_runs_a_federation(tmp_path):
    """A kavg federation on a local model folder reads parquet through data.columns and partitions by the
    file's own site column; held-out loss falls."""
    # Prepare
    folder = save_tiny_model(tmp_path / "model")
    rows = [
        {"question": r["instruction"], "answer": r["response"], "plant": r["site"], "ticket": i}
        for i, r in enumerate(row for s in demo_sites(2, facts_per_site=6) for row in s.train)
    ]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "qa.parquet"))
    cfg = _recipe(
        tmp_path / "recipe.toml",
        f"""
algorithm = "kavg"
num_rounds = 2
[model]
path = "{folder}"
trainable = "all"
[data]
source = "file"
path = "{tmp_path / "qa.parquet"}"
columns = "instruction=question,response=answer"
partition = "natural"
partition_by = "plant"
batch_size = 4
[eval]
num_examples = 8
max_new_tokens = 4
[kavg]
lr = 0.05
local_steps = 2
""",
    )

    # Execute
    summary = inproc.run(cfg, 2, run_dir=tmp_path / "run")

    # Assert
    assert summary["rounds_completed"] == 2
    assert summary["heldout_loss_last"] < summary["heldout_loss_first"]
    parts = [site_examples(cfg, i, 2, partitioner=flower_partitioner) for i in range(2)]
    assert [{ex["plant"] for ex in p} for p in parts] == [{"site-0"}, {"site-1"}]
    assert all(ex["system"] == "" for p in parts for ex in p)  # your data: no factory prompt


def test_deployed_site_with_another_model_copy_is_refused(tmp_path):
    """A site whose node config points model-path at a copy with other weights is refused when it builds its
    client, naming the site, its path and both fingerprints; the right copy builds."""
    # Prepare
    good = save_tiny_model(tmp_path / "good")
    bad = save_tiny_model(tmp_path / "bad", seed=5)
    keymod.generate(tmp_path / "keys", ["plant-a", "plant-b"])
    flat = cfgmod.flatten(
        cfgmod.from_run_config(
            {
                "algorithm": "kavg",
                "model.path": "/nowhere/the-servers-path",
                "model.sha256": folder_fingerprint(good),
                "model.trainable": "all",
                "data.batch_size": 4,
            }
        )
    )

    def context(site, model_path):
        node = {"site-id": site, "kit-dir": str(keymod.site_kit_dir(tmp_path / "keys", site)), "model-path": model_path}
        node["site-index"], node["num-sites"] = (0 if site == "plant-a" else 1), 2
        return Context(run_id=7, node_id=1, node_config=node, state=RecordDict(), run_config=flat)

    # Execute / Assert
    assert client_handler._client(context("plant-a", str(good))) is not None
    with pytest.raises(ValueError) as err:
        client_handler._client(context("plant-b", str(bad)))
    text = str(err.value)
    assert text.startswith("site plant-b:") and str(bad) in text
    assert folder_fingerprint(good)[:16] in text and folder_fingerprint(bad)[:16] in text

"""docs/troubleshooting.md lists the ten errors a new user meets first: each is triggered here, and the page
must quote what the code really says (a fragment without paths), so the page cannot drift from the code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_flat
from datasets import Dataset
from hf_fixtures import save_tiny_model

from edgetune import config as cfgmod
from edgetune import inproc
from edgetune.data.files import load_examples
from edgetune.data.prompts import encode_example
from edgetune.federation import RoundFailed, run_round
from edgetune.models.fingerprint import check_fingerprint, folder_fingerprint
from edgetune.models.load import load_model
from edgetune.models.tiny import tiny_tokenizer

PAGE = (Path(__file__).resolve().parents[1] / "docs" / "troubleshooting.md").read_text()


def _model_not_cached(tmp, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp / "hub"))
    load_model(cfgmod.ModelSection(path="Qwen/Qwen2.5-0.5B-Instruct", device="cpu"))


def _fingerprint_differs(tmp, monkeypatch):
    good, bad = save_tiny_model(tmp / "good"), save_tiny_model(tmp / "bad", seed=3)
    check_fingerprint(cfgmod.ModelSection(path=str(bad), sha256=folder_fingerprint(good)), who="site plant-b")


def _typo(tmp, monkeypatch):
    cfgmod.from_run_config({"modle.path": "x"})


def _missing_column(tmp, monkeypatch):
    Dataset.from_list([{"question": "q", "answer": "a"}]).to_parquet(str(tmp / "qa.parquet"))
    load_examples(tmp / "qa.parquet", columns={"instruction": "question", "response": "reply"})


def _unknown_shape(tmp, monkeypatch):
    (tmp / "p.jsonl").write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    load_examples(tmp / "p.jsonl")


def _chat_without_answer(tmp, monkeypatch):
    (tmp / "chats.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    load_examples(tmp / "chats.jsonl")


def _no_chat_template(tmp, monkeypatch):
    tok = tiny_tokenizer()
    tok.chat_template = None
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    encode_example(tok, chat, 100)


def _spsa_bf16(tmp, monkeypatch):
    cfgmod.RunConfig(model=cfgmod.ModelSection(dtype="bfloat16"))


def _quantize_on_cpu(tmp, monkeypatch):
    folder = save_tiny_model(tmp / "m")
    load_model(cfgmod.ModelSection(path=str(folder), device="cpu", trainable="lora", quantize="4bit"))


def _no_quorum(tmp, monkeypatch):
    cfg = cfgmod.from_run_config(tiny_flat(num_rounds=1))
    server, transport, recorder, *_ = inproc.build(cfg, 1, run_dir=tmp / "run")
    transport.offline = set(transport.sites())
    run_round(cfg, server, transport, recorder, 1)


CASES = [
    (_model_not_cached, ValueError, "is not a local folder and not in the Hugging Face cache"),
    (_model_not_cached, ValueError, "edgetune never downloads: on a machine with internet run `hf download"),
    (_fingerprint_differs, ValueError, "but the run's plan (model.sha256) says"),
    (_fingerprint_differs, ValueError, "this copy is another model, revision or dtype export."),
    (_typo, ValueError, "unknown config key(s): modle.path"),
    (_missing_column, ValueError, "has no column 'reply' (its columns: question, answer)"),
    (_unknown_shape, ValueError, "needs 'instruction' and 'response', or 'text', or 'messages'"),
    (_chat_without_answer, ValueError, "column 'messages' has no assistant turn (roles: user): nothing to train on"),
    (_no_chat_template, ValueError, "chat messages need a tokenizer with a chat template;"),
    (_spsa_bf16, ValueError, "algorithm = 'spsa' needs model.dtype = 'float32' (got 'bfloat16')"),
    (_quantize_on_cpu, ValueError, "model.quantize = '4bit' needs a CUDA device (bitsandbytes)"),
    (_quantize_on_cpu, ValueError, "(one site alone: edgetune site --quantize none)"),
    (_no_quorum, RoundFailed, "round 1 did not reach quorum (1 sites) in 3 attempts: site-0: no reply (offline)"),
]


@pytest.mark.parametrize(("trigger", "error", "fragment"), CASES, ids=[f"{c[0].__name__}:{c[2][:24]}" for c in CASES])
def test_documented_message_is_what_the_code_says(tmp_path, monkeypatch, trigger, error, fragment):
    """The error is raised with the fragment in its message, and the page quotes the same fragment."""
    with pytest.raises(error) as err:
        trigger(tmp_path, monkeypatch)
    assert fragment in str(err.value)
    assert fragment in PAGE


def test_the_page_has_ten_numbered_errors():
    """Ten numbered sections, each with a message block and a fix."""
    sections = [line for line in PAGE.splitlines() if line.startswith("## ") and line[3:4].isdigit()]
    assert [s.split(".")[0] for s in sections] == [f"## {i}" for i in range(1, 11)]
    assert PAGE.count("```text") == 10

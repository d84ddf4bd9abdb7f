"""benchmarks/spsa_sweep.py: one factor at a time, the per-probe step kept, verdicts and metrics read back."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import spsa_sweep
from edgetune.config import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "spsa" / "smollm2-135m-4c.toml"


@pytest.mark.parametrize("factor", spsa_sweep.FACTORS)
def test_variations_change_one_factor_and_include_the_recipes_value(factor):
    flat = load_recipe(RECIPE)
    values = spsa_sweep.variations(flat, factor)
    assert len({json.dumps(o, sort_keys=True) for _, o in values}) == len(values)
    for _label, overrides in values:
        # every override is a key of this factor's (probes move lr with them; the pool moves its optimizer)
        allowed = {
            "lr": {"spsa.lr"},
            "num_probes": {"spsa.num_probes", "spsa.lr"},
            "seed_pool": {"spsa.seed_pool", "spsa.pool_scope", "spsa.optimizer"},
            "eps": {"spsa.eps"},
            "batch_size": {"data.batch_size"},
        }[factor]
        assert set(overrides) <= allowed
    key = {"lr": "spsa.lr", "num_probes": "spsa.num_probes", "seed_pool": "spsa.seed_pool", "eps": "spsa.eps",
           "batch_size": "data.batch_size"}[factor]  # fmt: skip
    assert flat[key] in [o.get(key) for _, o in values]


def test_num_probes_keep_the_step_per_probe():
    flat = load_recipe(RECIPE)
    lr, probes = flat["spsa.lr"], flat["spsa.num_probes"]
    for _, o in spsa_sweep.variations(flat, "num_probes"):
        assert o["spsa.lr"] / o["spsa.num_probes"] == pytest.approx(lr / probes)


def test_the_recipes_own_values_are_one_run():
    flat = load_recipe(RECIPE)
    keys = [spsa_sweep.run_key(flat, o) for f in spsa_sweep.FACTORS for _, o in spsa_sweep.variations(flat, f)]
    assert keys.count("{}") == len(spsa_sweep.FACTORS)  # one "x" per factor, all the same run
    assert len(set(keys)) == len(keys) - len(spsa_sweep.FACTORS) + 1


def _row(factor, label, acc, loss, choice):
    return {
        "factor": factor, "label": label, "ok": True, "heldout_loss_first": 2.6, "heldout_loss_last": loss,
        "accuracy_first": 0.25, "accuracy_last": acc, "accuracy_best": acc, "choice_loss_last": choice,
        "uplink_bytes_per_site_round": 104.0, "wall_s": 10.0,
    }  # fmt: skip


def test_table_names_the_best_accuracy_with_ties_to_lower_loss_and_the_lowest_choice_loss():
    rows = [
        _row("lr", "lr=0.3", 0.30, 1.5, 1.9),
        _row("lr", "lr=0.6", 0.30, 1.4, 2.1),  # same accuracy, lower loss: best
        _row("lr", "lr=1.2", 0.28, 1.3, 1.7),  # lowest choice loss
        {**_row("lr", "lr=2.4", 0.9, 0.1, 0.1), "ok": False},  # failed runs never win
    ]
    table = spsa_sweep.format_table(rows)
    assert "best lr: lr=0.6 (accuracy 0.300, loss 1.4000)" in table
    assert "lowest choice loss, lr: lr=1.2 (1.7000)" in table


def test_run_one_reads_the_runs_metrics_and_asks_for_the_evaluation_cadence(tmp_path, monkeypatch):
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        name = next(a.split("=", 1)[1] for a in cmd if a.startswith("run.name="))
        run = tmp_path / name.strip('"')
        run.mkdir()
        rows = [
            {"round": 0, "heldout_loss": 2.6, "accuracy": 0.25, "choice_loss": 3.9},
            {"round": 1, "uplink_bytes": 416},
            {"round": 2, "uplink_bytes": 416, "heldout_loss": 1.9, "accuracy": 0.31, "choice_loss": 2.2},
        ]
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(spsa_sweep.subprocess, "run", fake_run)
    row = spsa_sweep.run_one(
        RECIPE, "lr=0.6", {"spsa.lr": 0.6}, rounds=2, sites=4, runs_dir=tmp_path, timeout_s=10, eval_every=2,
        version="abc123",
    )  # fmt: skip
    assert row["code"] == "abc123"  # the code version the run was trained on
    assert "eval.every_rounds=2" in seen["cmd"] and "eval.accuracy_every_rounds=2" in seen["cmd"]
    assert row["ok"] and row["accuracy_last"] == 0.31 and row["choice_loss_last"] == 2.2
    assert row["choice_loss_first"] == 3.9 and row["uplink_bytes_per_site_round"] == 104.0
    assert [p["round"] for p in row["curve"]] == [0, 2]  # rounds without an evaluation are not curve points


def test_append_keeps_finished_comparable_runs_and_runs_only_the_missing_ones(tmp_path, monkeypatch, capsys):
    """--append: a sweep cut short goes on where it stopped. Finished runs of the same recipe, rounds
    and sites are read back (an earlier factor stays in the table without running its missing values);
    a run of other rounds, a failed run, and the new factor's missing values run; a file that is not a
    sweep's is refused."""
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    flat = load_recipe(RECIPE)

    def stored(factor, label, overrides, **extra):
        return {**_row(factor, label, 0.3, 1.5, 2.0), "overrides": overrides, "rounds": 2, "sites": 4,
                "recipe": str(RECIPE), "accuracy_first": 0.25, **extra}  # fmt: skip

    x = flat["spsa.lr"]
    out.write_text(json.dumps([
        stored("lr", "lr=x/4", {"spsa.lr": x * 0.25}),
        stored("lr", "lr=x", {"spsa.lr": x}),
        stored("lr", "lr=2x", {"spsa.lr": x * 2.0}, rounds=3),  # another length: not comparable
        stored("eps", "eps=2^-9", {"spsa.eps": 2.0**-9}, ok=False),  # failed: runs again
    ]))  # fmt: skip
    started = []

    def fake_run_one(recipe, label, overrides, **kwargs):
        started.append(label)
        return {**stored("?", label, overrides), "ok": True, "curve": []}

    monkeypatch.setattr(spsa_sweep, "run_one", fake_run_one)
    args = ["--rounds", "2", "--sites", "4", "--out", str(out), "--plot", str(png), "--append"]
    assert spsa_sweep.main([*args, "--factors", "eps"]) == 0
    assert started == ["eps=2^-9", "eps=2^-5"]  # the recipe's eps is the finished lr=x run
    # the kept runs carry no code version: the call says they may come from other code
    assert "--append keeps 2 runs not trained on this code" in capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [(r["factor"], r["label"]) for r in rows] == [
        ("lr", "lr=0.15"), ("lr", "lr=0.6"), ("eps", "eps=2^-9"), ("eps", "eps=2^-7"), ("eps", "eps=2^-5")
    ]  # fmt: skip
    assert png.is_file()
    out.write_text('{"not": "a list"}')
    with pytest.raises(SystemExit, match="not a spsa_sweep results file"):
        spsa_sweep.main([*args, "--factors", "eps"])


DOCS_RECIPE = RECIPE.parent / "smollm2-135m-4c-docs-bias.toml"


def test_batch_values_follow_the_recipes_batch():
    """x/2, x, 2x: the demo recipe's 4, 8, 16 and the docs recipe's 12, 24, 48."""
    assert [o["data.batch_size"] for _, o in spsa_sweep.variations(load_recipe(RECIPE), "batch_size")] == [4, 8, 16]
    docs = [o["data.batch_size"] for _, o in spsa_sweep.variations(load_recipe(DOCS_RECIPE), "batch_size")]
    assert docs == [12, 24, 48]


def test_judged_by_loss_the_lowest_held_out_loss_wins(tmp_path, monkeypatch):
    """docs (--judge loss): accuracy says nothing (0 everywhere, or missing) and there is no choice loss; the
    lowest final held-out loss wins, a diverged (NaN) or failed run never does, the accuracy-judged table
    picks by accuracy, and the plot shows loss where it shows accuracy for the demo."""
    rows = [
        _row("lr", "lr=2", 0.0, 3.21, None),
        _row("lr", "lr=4", 0.0, 3.20, None),
        _row("lr", "lr=16", 0.0, float("nan"), None),
        {**_row("lr", "lr=8", 0.0, 3.0, None), "ok": False},
        {**_row("batch_size", "batch=12", None, 3.22, None), "accuracy_first": None},
        {**_row("batch_size", "batch=24", None, 3.19, None), "accuracy_first": None},
    ]
    table = spsa_sweep.format_table(rows, judge="loss")
    assert "best lr: lr=4 (held-out loss 3.2000)" in table and "choice loss, lr" not in table
    assert "best batch_size: batch=24 (held-out loss 3.1900)" in table
    by_accuracy = spsa_sweep.format_table([{**r, "accuracy_last": 0.5} if r["label"] == "lr=2" else r for r in rows])
    assert "best lr: lr=2 (accuracy 0.500" in by_accuracy
    assert "best batch_size: batch=24 (held-out loss 3.1900)" in by_accuracy  # no accuracy to judge by
    png = tmp_path / "docs.png"
    spsa_sweep.plot(rows, png, judge="loss")
    assert png.stat().st_size > 1000

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(spsa_sweep.subprocess, "run", fake_run)
    row = spsa_sweep.run_one(
        DOCS_RECIPE, "lr=4", {}, rounds=2, sites=4, runs_dir=tmp_path, timeout_s=10, eval_every=2, accuracy_every=0
    )
    assert "eval.every_rounds=2" in seen["cmd"] and "eval.accuracy_every_rounds=0" in seen["cmd"]
    assert not row["ok"] and row["accuracy_last"] is None

"""benchmarks/quality_per_byte.py: issue 11's goal check and --append (rows added to an existing table)."""

from __future__ import annotations

import json

import pytest

from benchmarks import quality_per_byte as qpb


def _row(algorithm, losses, up_per_round, train_s_per_round, *, seed=0, task="docs"):
    curve = [
        {"round": r, "heldout_loss": loss, "cum_uplink_bytes": r * up_per_round, "cum_train_s": r * train_s_per_round}
        for r, loss in enumerate(losses)
    ]
    return {
        "benchmark": "quality_per_byte", "algorithm": algorithm, "seed": seed, "model": "smollm2",
        "task": task, "ok": True, "curve": curve,
    }  # fmt: skip


def test_goal_ratios_at_the_first_round_spsa_reaches_fedavgs_first_round_gain():
    fedavg = _row("lowrank-fedavg", [3.0, 2.8, 2.7], 1_000_000, 10.0)  # first-round gain 0.2
    spsa = _row("spsa", [3.0, 2.9, 2.79, 2.7], 100, 30.0)  # reaches 0.21 >= 0.2 in round 2
    ratios = qpb.goal_ratios([spsa, fedavg])
    assert ratios["spsa_reached"] and ratios["spsa_round"] == 2
    assert ratios["fedavg_first_round_gain"] == pytest.approx(0.2)
    assert ratios["bytes_ratio"] == pytest.approx(200 / 1_000_000)
    assert ratios["time_ratio"] == pytest.approx(60.0 / 10.0)


def test_goal_ratios_report_spsas_best_gain_when_it_never_gets_there():
    fedavg = _row("lowrank-fedavg", [3.0, 2.5], 1_000_000, 10.0)  # gain 0.5
    spsa = _row("spsa", [3.0, 2.9, 2.8, 2.85], 100, 30.0)  # best 0.2 in round 2, worse after
    ratios = qpb.goal_ratios([spsa, fedavg])
    assert not ratios["spsa_reached"] and ratios["spsa_round"] == 2
    assert ratios["gain_ratio"] == pytest.approx(0.2 / 0.5)
    assert ratios["bytes_ratio"] == pytest.approx(200 / 1_000_000)


def test_no_goal_when_fedavgs_first_round_gained_nothing_in_the_metric():
    """Accuracy 0 -> 0 (the docs task) or a first round that got worse: there is no gain to reach, so no
    goal row, rather than spsa "reaching" a gain of 0 or less."""
    fedavg = _row("lowrank-fedavg", [3.0, 2.8], 1_000_000, 10.0)
    spsa = _row("spsa-bias", [3.0, 2.95, 2.9], 900, 30.0)
    for fed_acc in ([0.0, 0.0], [0.4, 0.3]):
        for point, a in zip(fedavg["curve"], fed_acc):
            point["accuracy"] = a
        for point in spsa["curve"]:
            point["accuracy"] = 0.0
        assert qpb.goal_ratios([spsa, fedavg], "spsa-bias", "accuracy") is None
        goals = qpb.all_goal_ratios([spsa, fedavg])
        assert [(g["spsa_algorithm"], g["metric"]) for g in goals] == [("spsa-bias", "heldout_loss")]
        assert not goals[0]["spsa_reached"] and goals[0]["gain_ratio"] == pytest.approx(0.1 / 0.2)


def test_append_keeps_other_rows_replaces_the_same_algorithm_and_seed_and_refuses_another_task(tmp_path):
    out = tmp_path / "q.json"
    old = [
        _row("spsa", [3.0, 2.9], 100, 1.0),
        _row("central-mezo", [3.0, 2.99], 0, 1.0),
        {"benchmark": "quality_per_byte_goal", "gain_ratio": 0.1},
    ]
    out.write_text(json.dumps(old))
    kept = qpb.previous_rows(out, "smollm2", "docs", [("central-mezo", 0), ("central-lora", 0)])
    assert [r["algorithm"] for r in kept] == ["spsa"]  # the goal row is recomputed, mezo replaced
    assert qpb.previous_rows(tmp_path / "missing.json", "smollm2", "docs", []) == []
    with pytest.raises(SystemExit, match="triage"):
        qpb.previous_rows(out, "smollm2", "triage", [])
    out.write_text("{not json")
    with pytest.raises(SystemExit, match="not a quality_per_byte table"):
        qpb.previous_rows(out, "smollm2", "docs", [])


def test_every_spsa_variant_runs_the_tasks_spsa_recipe_with_only_its_own_overrides():
    """spsa, spsa-v1 and spsa-choices share the task's recipe; spsa-choices changes the objective and
    nothing else."""
    for model, task in (("smollm2", "triage"), ("tiny", "triage")):
        recipe, extra = qpb.recipe_for("spsa", model, task)
        assert extra == []
        assert qpb.recipe_for("spsa-choices", model, task) == (recipe, ["spsa.objective=choices"])
        v1_recipe, v1_extra = qpb.recipe_for("spsa-v1", model, task)
        assert v1_recipe == recipe and "spsa.objective=choices" not in v1_extra and v1_extra


def test_goal_ratios_read_accuracy_gains_upwards_and_name_the_spsa_run():
    """For accuracy a gain is a rise; all_goal_ratios covers spsa and spsa-head, each metric it can read."""
    fedavg = _row("lowrank-fedavg", [3.0, 2.0], 1_000_000, 10.0)
    head = _row("spsa-head", [3.0, 2.95, 2.9], 2_000, 4.0)
    for row, acc in ((fedavg, [0.25, 0.32]), (head, [0.25, 0.30, 0.40])):
        for point, a in zip(row["curve"], acc):
            point["accuracy"] = a
    ratios = qpb.goal_ratios([head, fedavg], "spsa-head", "accuracy")
    assert ratios["spsa_reached"] and ratios["spsa_round"] == 2 and ratios["spsa_algorithm"] == "spsa-head"
    assert ratios["fedavg_first_round_gain"] == pytest.approx(0.07)
    assert ratios["spsa_gain"] == pytest.approx(0.15) and ratios["bytes_ratio"] == pytest.approx(4_000 / 1_000_000)
    goals = qpb.all_goal_ratios([head, fedavg])
    assert [(g["spsa_algorithm"], g["metric"]) for g in goals] == [
        ("spsa-head", "heldout_loss"),
        ("spsa-head", "accuracy"),
    ]
    assert not goals[0]["spsa_reached"] and goals[0]["gain_ratio"] == pytest.approx(0.1 / 1.0)
    assert qpb.goal_ratios([head, fedavg], "spsa") is None


def test_spsa_head_runs_the_label_head_recipe_with_its_own_batch_and_counts_one_pass_per_site():
    from edgetune.config import load_recipe

    recipe, own = qpb.recipe_for("spsa-head", "smollm2", "triage")
    assert recipe.name == "smollm2-135m-4c-head.toml" and own == ["data.batch_size=120"]
    assert load_recipe(recipe)["model.trainable"] == "label-head"
    with pytest.raises(ValueError, match="no label-head"):
        qpb.recipe_for("spsa-head", "tiny", "triage")
    assert load_recipe(recipe)["spsa.scalar_codec"] == "sign"  # one bit per scalar
    byte_recipe, byte_own = qpb.recipe_for("spsa-head-int8", "smollm2", "triage")
    assert byte_recipe == recipe and byte_own == [*own, "spsa.scalar_codec=int8-sr"]
    assert load_recipe(byte_recipe, byte_own)["spsa.scalar_codec"] == "int8-sr"
    flat = load_recipe(recipe, [*qpb.common_overrides("smollm2", 10, 4, 0, 1, "triage"), *own])
    assert flat["data.batch_size"] == 120  # its own key wins over the shared ones
    # 4 sites x 120 training reports, counted in the task's batches of 8: 60 forwards for the run, 6 per round
    # over 10 rounds (in its own batches of 120 it would be 4)
    assert qpb.forwards_per_round(flat, "smollm2", 4, unit_batch=8) == pytest.approx(6.0)
    assert qpb.forwards_per_round(flat, "smollm2", 4) == pytest.approx(0.4)


def test_spsa_bias_runs_the_token_bias_recipe_and_counts_one_pass_over_the_pooled_passages():
    from edgetune.config import load_recipe

    recipe, own = qpb.recipe_for("spsa-bias", "smollm2", "docs")
    assert recipe.name == "smollm2-135m-4c-docs-bias.toml" and own == ["data.batch_size=24"]
    assert load_recipe(recipe)["model.trainable"] == "token-bias"
    with pytest.raises(ValueError, match="no token-bias"):
        qpb.recipe_for("spsa-bias", "smollm2", "triage")
    flat = load_recipe(recipe, [*qpb.common_overrides("smollm2", 4, 4, 0, 0, "docs"), *own])
    assert flat["data.batch_size"] == 24 and flat["spsa.bias_examples"] == 100
    # every docs site has more than 100 passages: 100 each pass through the model once, in the task's batches
    # of 8 (13 per site), spread over the 4 rounds
    assert qpb.forwards_per_round(flat, "smollm2", 4, unit_batch=8) == pytest.approx(4 * 13 / 4)
    goals = qpb.all_goal_ratios(
        [_row("spsa-bias", [3.0, 2.95, 2.9], 2_000, 4.0), _row("lowrank-fedavg", [3.0, 2.8], 10**6, 10.0)]
    )
    assert {g["spsa_algorithm"] for g in goals} == {"spsa-bias"}


def test_every_run_starts_without_the_label_head_features_of_an_earlier_one():
    """The sites' feature files outlive a run (keyed by weights and data, not by run), so a second
    spsa-head run would skip its feature pass and report less training time: they are cleared for the
    run's sites, and the sites' other state is left alone."""
    from edgetune.config import ModelSection
    from edgetune.models.folders import cache_root

    root = cache_root(ModelSection(path="smollm2")) / "sites"
    for i in range(3):
        (root / f"site-{i}" / "label-head-features").mkdir(parents=True, exist_ok=True)
        (root / f"site-{i}" / "label-head-features" / "k.safetensors").write_bytes(b"x")
        (root / f"site-{i}" / "replay-guard").mkdir(parents=True, exist_ok=True)
    qpb._clear_features("smollm2", 2)
    assert not (root / "site-0" / "label-head-features").exists()
    assert not (root / "site-1" / "label-head-features").exists()
    assert (root / "site-2" / "label-head-features" / "k.safetensors").exists()  # not one of the run's sites
    assert all((root / f"site-{i}" / "replay-guard").is_dir() for i in range(3))

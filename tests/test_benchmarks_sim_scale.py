"""sim_scale rows say which message window a run used: read from the run's resolved config, never assumed."""

from __future__ import annotations

from benchmarks import sim_scale


def test_the_window_is_read_from_the_runs_resolved_config(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('num_rounds = 2\n\n[run]\nname = "x"\nin_flight = 8\n')
    assert sim_scale._resolved(cfg, "run", "in_flight") == 8
    assert sim_scale._resolved(cfg, "run", "sites_per_round") is None
    assert sim_scale._resolved(tmp_path / "missing.toml", "run", "in_flight") is None
    cfg.write_text("[run\nbroken")
    assert sim_scale._resolved(cfg, "run", "in_flight") is None

"""benchmarks/paper_claims.py: equal-bytes interpolation, the settled test, verdicts (including "not
measurable here" for a run that did not finish) and the sharing of identical configurations."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from benchmarks import code_version
from benchmarks import paper_claims as pc


def _run(name, losses, up_per_round=100, ok=True, **curves):
    """A run row with held-out losses per round (round 0 first) and optional per-round curve values."""
    curve = []
    for r, loss in enumerate(losses):
        point = {"round": r, "cum_uplink_bytes": up_per_round * r, "samples": 10 * r, "heldout_loss": loss}
        point.update({k: v[r] for k, v in curves.items() if r < len(v) and v[r] is not None})
        curve.append(point)
    return {
        "run": name,
        "seed": 0,
        "ok": ok,
        "timed_out": not ok,
        "exit_code": 0 if ok else -1,
        "rounds_completed": len(losses) - 1 if ok else 1,
        "heldout_loss_first": losses[0],
        "heldout_loss_last": losses[-1],
        "uplink_bytes_total": up_per_round * (len(losses) - 1),
        "samples_total": 10 * (len(losses) - 1),
        "settled": pc.settled(losses),
        "imv_last": curves.get("imv", [None])[-1],
        "imv_capped_last": 0,
        "curve": curve,
    }


def test_loss_at_bytes_interpolates_linearly_and_stops_at_the_end():
    """Losses 4, 3, 2 at 0, 100, 200 bytes: 150 B gives 2.5, 200 B the last point, 250 B nothing."""
    run = _run("x", [4.0, 3.0, 2.0])
    assert pc.loss_at_bytes(run, 150) == pytest.approx(2.5)
    assert pc.loss_at_bytes(run, 200) == pytest.approx(2.0)
    assert pc.loss_at_bytes(run, 250) is None


def test_settled_means_the_last_quarter_gave_under_a_tenth_of_the_drop():
    """Drop 4 -> 1 (3): a last quarter from 1.2 to 1.0 (0.2 < 0.3) is settled, from 1.5 (0.5) is not."""
    assert pc.settled([4.0, 2.0, 1.5, 1.3, 1.2, 1.1, 1.05, 1.02, 1.0]) is True
    assert pc.settled([4.0, 3.0, 2.5, 2.2, 2.0, 1.8, 1.6, 1.5, 1.0]) is False
    assert pc.settled([4.0, 3.0]) is None


def _all_runs(**replace):
    rows = {
        "kavg-K1": _run("kavg-K1", [5.0, 4.0, 3.5, 3.2, 3.1, 3.05]),
        "kavg-K4": _run("kavg-K4", [5.0, 3.6, 3.2, 3.0, 2.95, 2.9]),
        "kavg-K16": _run("kavg-K16", [5.0, 3.4, 3.1, 3.0, 2.9, 2.85]),
        "kavg-const": _run("kavg-const", [5.0, 3.6, 3.2, 3.0, 2.95, 2.9]),
        "kavg-thm2": _run("kavg-thm2", [5.0, 3.9, 3.3, 3.0, 2.9, 2.8]),
        "lowrank-fedavg": _run(
            "lowrank-fedavg", [5.0, 4.5, 4.2, 4.1, 4.05, 4.0], product_gap=[None, 0.1, 0.2, 0.2, 0.2, 0.2]
        ),
        "lowrank-exact": _run("lowrank-exact", [5.0, 4.4, 4.1, 4.0, 3.95, 3.9]),
        "lowrank-ab": _run(
            "lowrank-ab", [5.0, 4.6, 4.3, 4.1, 4.0, 3.95], up_per_round=55, svd_rank=[None, 4, 3, 3, 3, 2]
        ),
        "lowrank-ab-fullrank": _run(
            "lowrank-ab-fullrank", [5.0, 4.5, 4.2, 4.0, 3.95, 3.9], up_per_round=90, svd_rank=[None, 4, 4, 4, 4, 4]
        ),
        "kavg": _run("kavg", [5.0, 3.6, 3.2, 3.0, 2.95, 2.9], imv=[None] * 5 + [2.0]),
        "dppf": _run(
            "dppf",
            [5.0, 3.5, 3.1, 2.9, 2.85, 2.8],
            imv=[None] * 5 + [1.5],
            worker_mv=[None, 0.05, 0.15, 0.22, 0.23, 0.23],
            dppf_alpha=[None, 0.5, 0.5, 0.5, 0.5, 0.5],
            dppf_lam=[None, 0.0, 0.05, 0.1, 0.1, 0.1],
        ),
        "dppf-pull-push": _run(
            "dppf-pull-push", [5.0, 3.5, 3.2, 3.0, 2.9, 2.85], worker_mv=[None, 0.05, 0.3, 0.3, 0.25, 0.24]
        ),
        "dppf-2lam": _run(
            "dppf-2lam",
            [5.0, 3.5, 3.1, 2.9, 2.85, 2.8],
            worker_mv=[None, 0.05, 0.3, 0.42, 0.43, 0.43],
            dppf_alpha=[None, 0.5, 0.5, 0.5, 0.5, 0.5],
            dppf_lam=[None, 0.0, 0.1, 0.2, 0.2, 0.2],
        ),
        "deft": _run(
            "deft",
            [5.0, 3.7, 3.25, 3.05, 2.98, 2.95],
            union_over_k=[None, 1.0, 1.0, 1.0, 1.0, 1.0],
            kp_size_gap=[None, 0.1] + [0.1] * 4,
        ),
        "deft-applied": _run(
            "deft-applied",
            [5.0, 3.7, 3.3, 3.1, 3.05, 3.0],
            union_over_k=[None] + [1.0] * 5,
            kp_size_gap=[None, 0.0, 0.2, 0.3, 0.4, 0.5],
        ),
        "topk": _run(
            "topk", [5.0, 3.6, 3.2, 3.0, 2.96, 2.92], up_per_round=300, union_over_k=[None, 1.8, 2.4, 2.9, 3.1, 3.2]
        ),
    }
    rows.update(replace)
    return list(rows.values())


def test_verdicts_follow_the_numbers():
    """With synthetic curves built to hold or fail each rule, every verdict is the one the rule gives."""
    claims = {c["id"]: c for c in pc.evaluate_claims(_all_runs())}

    assert claims["kavg-k"]["verdict"] == "held"  # K=16 ends at 2.85 < K=1's 3.05
    assert claims["kavg-theorem2"]["verdict"] == "held"  # 2.80 < 2.90 - 0.05
    assert claims["lowrank-exact"]["verdict"] == "held"
    assert claims["lowrank-ab-traffic"]["verdict"] == "held"  # 45% less uplink, 3.95 within 10% of 1.1
    assert claims["lowrank-full-rank"]["verdict"] == "held"  # mean rank 4 vs 2.75 after round 1
    assert claims["dppf-loss"]["verdict"] == "held"  # 2.80 < 2.90 - 0.05
    assert claims["dppf-flat"]["verdict"] == "held"  # IMV 1.5 < 0.95 x 2.0
    assert claims["dppf-width"]["verdict"] == "held"  # 0.23 in [0.2, 0.25], 0.43 in [0.4, 0.45]
    assert claims["deft-union"]["verdict"] == "held"
    assert claims["deft-dense"]["verdict"] == "held"  # 2.05 of 2.10 = 98%
    assert claims["deft-allocation"]["verdict"] == "held"
    evidence = claims["deft-allocation"]["evidence"]  # last quarter (the last of 5 rounds) of the gaps
    assert "site norms 0.100, applied 0.500 (applied in round 2: 0.200)" in evidence


def test_a_claim_on_a_run_that_did_not_finish_is_not_measurable():
    """A timed-out run makes every claim that reads it "not measurable here", naming the run; the others stand."""
    broken = _run("dppf", [5.0, 4.0], ok=False)
    claims = {c["id"]: c for c in pc.evaluate_claims(_all_runs(dppf=broken))}

    for cid in ("dppf-loss", "dppf-flat", "dppf-width", "dppf-ramp"):
        assert claims[cid]["verdict"] == "not measurable here"
        assert "run dppf" in claims[cid]["evidence"] and "timed out" in claims[cid]["evidence"]
    assert claims["kavg-k"]["verdict"] == "held"


def test_claims_that_do_not_hold_say_so():
    """dppf worse than kavg, and a top-k union that does not grow, are "not held"."""
    worse = _run(
        "dppf",
        [5.0, 3.8, 3.5, 3.3, 3.2, 3.1],
        imv=[None] * 5 + [2.5],
        worker_mv=[None] + [0.23] * 5,
        dppf_alpha=[None] + [0.5] * 5,
        dppf_lam=[None] + [0.1] * 5,
    )
    flat_topk = _run("topk", [5.0, 3.6, 3.2, 3.0, 2.96, 2.92], union_over_k=[None] + [1.0] * 5)
    claims = {c["id"]: c for c in pc.evaluate_claims(_all_runs(dppf=worse, topk=flat_topk))}

    assert claims["dppf-loss"]["verdict"] == "not held"
    assert claims["dppf-flat"]["verdict"] == "not held"
    assert claims["deft-union"]["verdict"] == "not held"


def test_identical_configurations_run_once():
    """On SmolLM2 the recipe's kavg (K = 4, batch 8, 16 rounds) is also kavg-K4 and the constant side of
    the Theorem 2 pair: one fingerprint; on tiny (K = 2, batch 4, 40 rounds) they are three runs."""
    smol = {j.spec.name: j.key for j in pc.jobs_for("smollm2", [0], ["kavg", "dppf"])}
    tiny = {j.spec.name: j.key for j in pc.jobs_for("tiny", [0], ["kavg", "dppf"])}

    assert smol["kavg"] == smol["kavg-K4"] == smol["kavg-const"]
    assert len({tiny["kavg"], tiny["kavg-K4"], tiny["kavg-const"]}) == 3
    assert len(set(smol.values())) == len(smol) - 2


def test_runs_selects_runs_of_the_groups_and_names_an_unknown_one():
    """--runs keeps only the named runs (a machine without the hours for a whole group); the claims that
    read a run left out say so instead of comparing against nothing."""
    jobs = pc.jobs_for("smollm2", [0], ["dppf"], only=["kavg", "dppf"])
    assert [j.spec.name for j in jobs] == ["kavg", "dppf"]
    with pytest.raises(ValueError, match="dppf-3lam"):
        pc.jobs_for("smollm2", [0], ["dppf"], only=["dppf-3lam"])
    rows = [_run("kavg", [5.0, 4.0, 3.9, 3.85]), _run("dppf", [5.0, 3.9, 3.8, 3.78])]
    claims = {c["id"]: c for c in pc.evaluate_claims(rows)}
    assert claims["dppf-loss"]["verdict"] == "held"
    spread = claims["dppf-width"]
    assert spread["verdict"] == "not measurable here" and "dppf-2lam was not run" in spread["evidence"]


def test_a_run_trained_to_the_end_but_stopped_before_its_probe_is_probed_not_restarted(tmp_path, monkeypatch):
    """An invocation stopped between a run's last round and its IMV probe leaves a finished journal and no
    ``bench-run.json``; restarting edgetune.inproc there fails (the journal refuses a finished run), so the
    next invocation must only probe the checkpoint and record the row as finished."""
    job = next(j for j in pc.jobs_for("tiny", [0], ["kavg"]) if j.spec.name == "kavg-K16")
    name = f"pc-{job.spec.name}-{job.model}-s{job.seed}-{job.key}"
    run_dir = tmp_path / name
    run_dir.mkdir()
    rows = [{"round": 0, "heldout_loss": 5.0, "uplink_bytes": 0, "downlink_bytes": 0, "cum_uplink_bytes": 0}]
    for r in range(1, job.rounds + 1):
        rows.append(
            {
                "round": r,
                "heldout_loss": 5.0 - r / job.rounds,
                "uplink_bytes": 10,
                "downlink_bytes": 20,
                "cum_uplink_bytes": 10 * r,
            }
        )
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "summary.json").write_text(json.dumps({"wall_s": 123.0, "checkpoint": str(run_dir / "ckpt")}))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    probes = []
    monkeypatch.setattr(pc.subprocess, "run", no_training)
    monkeypatch.setattr(pc, "cleanup", lambda *a, **k: None)
    monkeypatch.setattr(pc, "probe_checkpoint", lambda d, *a, **k: probes.append(d) or {"imv_last": 2.5})
    row = pc.run_job(job, tmp_path, timeout_s=60, threads=1, keep=True, version="abc123")

    assert probes == [run_dir]
    assert row["code"] == "abc123"  # the code version the row was finished under, kept in bench-run.json
    assert pc.run_job(job, tmp_path, timeout_s=60, threads=1, keep=True, version="other")["code"] == "abc123"
    assert row["ok"] and row["rounds_completed"] == job.rounds and row["exit_code"] == 0
    assert row["imv_last"] == 2.5 and row["uplink_bytes_total"] == 10 * job.rounds
    assert row["wall_s"] >= 123.0
    assert json.loads((run_dir / "bench-run.json").read_text())["probe"] == {"imv_last": 2.5}

    # One round short: that run is resumed (the subprocess runs), not taken as finished.
    (run_dir / "bench-run.json").unlink()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:-1]))
    with pytest.raises(AssertionError, match="started again"):
        pc.run_job(job, tmp_path, timeout_s=60, threads=1, keep=True)


def test_claims_from_any_partial_set_of_runs_never_crash():
    """The results file is rewritten after every finished run, so claims are evaluated on every partial set:
    a run that is missing or unfinished, even one a claim only mentions (top-k beside deft's allocation),
    makes the claims that need it "not measurable here" and leaves the evidence of the others readable."""
    full = _all_runs()
    names = [row["run"] for row in full]
    subsets = [full[:i] for i in range(1, len(full))]
    subsets += [[row for row in full if row["run"] != n] for n in names]
    subsets += [_all_runs(**{n: _run(n, [5.0, 4.0], ok=False)}) for n in names]
    for rows in subsets:
        present = {row["run"] for row in rows if row["ok"]}
        for claim in pc.evaluate_claims(rows):
            if not set(claim["runs"]) <= present:
                assert claim["verdict"] == "not measurable here", claim
    no_topk = {c["id"]: c for c in pc.evaluate_claims([row for row in full if row["run"] != "topk"])}
    assert no_topk["deft-allocation"]["verdict"] == "held"
    assert "top-k -" in no_topk["deft-allocation"]["evidence"]


def _file_row(name, losses, model="smollm2"):
    row = _run(name, losses)
    best = min(range(len(losses)), key=losses.__getitem__)
    return {
        **row,
        "kind": "run",
        "model": model,
        "rounds": len(losses) - 1,
        "heldout_loss_best": losses[best],
        "best_round": best,
        "wall_s": 1.0,
    }


def test_append_keeps_earlier_runs_replaces_rerun_ones_and_rejudges_the_claims(tmp_path, monkeypatch):
    """--append: a slow model's groups run on different days and land in one table. Runs this call does
    not re-run are kept (and read by the claims, e.g. deft's dense kavg reference), a re-run replaces its
    old row, the earlier command stays on record, and a file of another model is refused."""
    out, png = tmp_path / "claims.json", tmp_path / "claims.png"
    earlier = [
        _file_row("kavg", [5.0, 4.0, 3.9, 3.85]),
        _file_row("dppf", [5.0, 3.9, 3.8, 3.78]),
        {"kind": "meta", "model": "smollm2", "command": "python -m benchmarks.paper_claims --runs kavg,dppf",
         "wall_s_total": 1800.0, "complete": True, "note": "day one"},
    ]  # fmt: skip
    out.write_text(json.dumps(earlier))
    started = []

    def fake_run(job, runs_dir, **kwargs):
        started.append(job.spec.name)
        return _file_row(job.spec.name, {"deft": [5.0, 3.7, 3.6, 3.55], "kavg": [5.0, 4.5, 4.4, 4.35]}[job.spec.name])

    monkeypatch.setattr(pc, "run_job", fake_run)
    monkeypatch.setattr(pc, "plot", lambda rows, path: None)
    args = ["--model", "smollm2", "--out", str(out), "--plot", str(png), "--append"]
    assert pc.main([*args, "--groups", "deft", "--runs", "deft"]) == 0
    assert started == ["deft"]
    rows = json.loads(out.read_text())
    runs = {r["run"]: r for r in rows if r["kind"] == "run"}
    assert sorted(runs) == ["deft", "dppf", "kavg"] and runs["kavg"]["heldout_loss_last"] == 3.85
    claims = {r["id"]: r for r in rows if r["kind"] == "claim"}
    assert claims["dppf-loss"]["verdict"] == "held"  # judged from the kept runs alone
    assert claims["deft-dense"]["verdict"] == "held"  # the new deft run against the kept dense kavg
    meta = next(r for r in rows if r["kind"] == "meta")
    assert [e["note"] for e in meta["earlier"]] == ["day one"]
    assert "day one" in pc.markdown(rows)

    # a re-run replaces the old row (one kavg, the new numbers), and earlier metas accumulate
    assert pc.main([*args, "--groups", "dppf", "--runs", "kavg"]) == 0
    rows = json.loads(out.read_text())
    kavg = [r for r in rows if r.get("run") == "kavg"]
    assert len(kavg) == 1 and kavg[0]["heldout_loss_last"] == 4.35
    assert len(next(r for r in rows if r["kind"] == "meta")["earlier"]) == 2

    # without --append the file holds this call's runs only; another model's file is refused
    assert pc.main(args[:-1] + ["--groups", "deft", "--runs", "deft"]) == 0
    assert [r["run"] for r in json.loads(out.read_text()) if r["kind"] == "run"] == ["deft"]
    with pytest.raises(SystemExit, match="smollm2"):
        pc.main(["--model", "tiny", "--out", str(out), "--plot", str(png), "--append", "--groups", "deft"])
    out.write_text('{"not": "a list"}')
    with pytest.raises(SystemExit, match="not a paper_claims results file"):
        pc.main([*args, "--groups", "deft", "--runs", "deft"])


def test_append_reads_back_a_run_of_the_same_configuration_under_another_name(tmp_path, monkeypatch):
    """The K = 4 kavg run is also the dppf group's baseline: once on record (with its command line), a
    later --append call that needs the same configuration reads it back instead of running it again;
    a run whose command differs in any resolved setting (K = 16) still runs."""
    out, png = tmp_path / "claims.json", tmp_path / "claims.png"
    k4 = pc.jobs_for("smollm2", [0], ["kavg"], only=["kavg-K4"])[0]
    baseline = pc.jobs_for("smollm2", [0], ["dppf"], only=["kavg"])[0]
    assert baseline.key == k4.key and baseline.command != k4.command  # same run, spelled differently
    stored = {**_file_row("kavg", [5.0, 4.0, 3.9, 3.85]), "seed": 0, "command": baseline.command}
    out.write_text(json.dumps([stored]))
    assert pc.row_key(stored) == k4.key
    assert pc.row_key({**stored, "command": baseline.command.replace("run.seed=0", "run.seed=1")}) != k4.key
    assert pc.row_key({**stored, "command": "python -m edgetune.inproc gone.toml --sites 4"}) is None
    assert pc.row_key({"command": "something else"}) is None
    started = []

    def fake_run(job, runs_dir, **kwargs):
        started.append(job.spec.name)
        return {**_file_row(job.spec.name, [5.0, 4.2, 4.1, 4.0]), "seed": 0, "command": job.command}

    monkeypatch.setattr(pc, "run_job", fake_run)
    monkeypatch.setattr(pc, "plot", lambda rows, path: None)
    args = ["--model", "smollm2", "--out", str(out), "--plot", str(png), "--append", "--groups", "kavg"]
    assert pc.main([*args, "--runs", "kavg-K4,kavg-K16"]) == 0
    assert started == ["kavg-K16"]
    runs = {r["run"]: r for r in json.loads(out.read_text()) if r["kind"] == "run"}
    assert sorted(runs) == ["kavg", "kavg-K16", "kavg-K4"]
    assert runs["kavg-K4"]["heldout_loss_last"] == 3.85 and runs["kavg-K4"]["group"] == "kavg"
    assert runs["kavg-K4"]["command"] == baseline.command  # what actually ran, not a command never run


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_code_version_names_the_commit_and_marks_uncommitted_code_changes(tmp_path):
    assert code_version(tmp_path) is None  # not a checkout: nothing to name
    (tmp_path / "edgetune").mkdir()
    (tmp_path / "edgetune" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("readme\n")
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert code_version(tmp_path) == sha
    (tmp_path / "README.md").write_text("docs only\n")  # outside the code paths
    (tmp_path / "edgetune" / "new.py").write_text("y = 2\n")  # untracked
    assert code_version(tmp_path) == sha
    (tmp_path / "edgetune" / "a.py").write_text("x = 2\n")
    assert code_version(tmp_path) == sha + "+dirty"


def test_the_report_names_runs_trained_on_other_code():
    def rows(codes, meta_code):
        extra = {"kind": "run", "rounds": 1, "heldout_loss_best": 4.0, "best_round": 1, "wall_s": 1.0}
        runs = [{**_run(f"r{i}", [5.0, 4.0]), **extra, "code": c} for i, c in enumerate(codes)]
        return [*runs, {"kind": "meta", "command": "x", "code": meta_code}]

    assert "not trained on this file's code" not in pc.markdown(rows(["aaa", "aaa"], "aaa"))
    report = pc.markdown(rows(["aaa", "bbb", None], "aaa"))
    line = next(x for x in report.splitlines() if "not trained on this file's code (aaa)" in x)
    assert "r1" in line and "r2" in line and "r0" not in line
    assert "was not recorded" in pc.markdown(rows([None, None], None))

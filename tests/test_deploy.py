"""The entry points' drivers (edgetune/deploy/, simulate.py) as the CLI uses them: bad options refused with
a clear error before any process starts, and the site's SuperNode supervised (its log passed through, a
refused activation retried while time is left, its whole process group stopped)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from typer.testing import CliRunner

from edgetune import cli
from edgetune import config as cfgmod
from edgetune.deploy import site as site_driver
from edgetune.simulate import prepare, sim_in_flight, with_sim_in_flight

RECIPE = "recipes/spsa/tiny-4c.toml"


@pytest.fixture()
def kit(tmp_path):
    folder = tmp_path / "kit"
    folder.mkdir()
    (folder / "site.json").write_text('{"site_id": "plant-a"}')
    return folder


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["site", "--kit", "{tmp}/nokit", "--superlink", "127.0.0.1:9", "--demo-index", "0"], "is not a site kit"),
        (["site", "--kit", "{kit}", "--superlink", "10.0.0.5:9", "--demo-index", "0", "--insecure"], "loopback tests"),
        (
            [
                "site",
                "--kit",
                "{kit}",
                "--superlink",
                "127.0.0.1:9",
                "--demo-index",
                "0",
                "--device",
                "cpu",
                "--devices",
                "cuda:0",
            ],
            "give --device or --devices, not both",
        ),  # fmt: skip
        (
            ["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9", "--demo-index", "0", "--devices", "auto,cpu"],
            "--devices: model.device: 'auto' cannot be part",
        ),  # fmt: skip
        (["site", "--kit", "{kit}", "--superlink", "no-port", "--demo-index", "0"], "is not host:port"),
        (["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9"], "give --data PATH"),
        (["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9", "--data", "{tmp}/none.jsonl"], "does not exist"),
        (
            ["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9", "--demo-index", "0", "--quantize", "2bit"],
            "--quantize must be none, 4bit or 8bit",
        ),  # fmt: skip
        (
            ["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9", "--demo-index", "0", "--leave-after-idle", "-5"],
            "--leave-after-idle must be >= 0 seconds, got -5",
        ),  # fmt: skip
        (
            ["site", "--kit", "{kit}", "--superlink", "127.0.0.1:9", "--demo-index", "0", "--quantize", "4bit"]
            + ["--devices", "cuda:0,cuda:1"],
            "--quantize 4bit with --devices",
        ),  # fmt: skip
        (["server", RECIPE, "--keys", "{tmp}/nokeys"], "registry.json"),
        (["keys", "{tmp}/k", "--sites", " , "], "--sites names no site"),
        (["certs", "{tmp}/nokeys", "--hosts", "a"], "no site registry in"),
        (["simulate", RECIPE, "--cpus-per-site", "0.5"], "--cpus-per-site must be a whole number"),
        (["simulate", RECIPE, "--sites", "-1"], "run.num_sites must be >= 0, got -1"),
        (["simulate", RECIPE, "--gpus-per-site", "1.5"], "--gpus-per-site must be 0, a fraction"),
    ],
)
def test_bad_options_are_refused_with_a_clear_error_and_exit_1(tmp_path, kit, args, message):
    argv = [a.format(tmp=tmp_path, kit=kit) for a in args]
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 1, result.output
    flat = "".join(result.output.split())  # rich wraps long lines, even inside words
    assert flat.startswith("error:") and "".join(message.split()) in flat
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "k").exists() and not (tmp_path / "runs").exists()  # nothing was made


def test_prepare_names_the_run_and_fixes_its_folder_and_site_count(tmp_path):
    flat = cfgmod.load_recipe(RECIPE, [f"run.dir={tmp_path}"])
    cfg = cfgmod.from_run_config(flat)
    flat2, cfg2, run_dir = prepare(flat, cfg, 0)
    assert cfg2.run.num_sites == (cfg.run.num_sites or 4) and run_dir.parent == tmp_path.resolve()
    assert flat2["run.name"] == run_dir.name == cfg2.run.name and "run.name" not in flat  # the caller's dict kept
    assert prepare(flat, cfg, 3)[1].run.num_sites == 3


def test_flower_simulation_windows_its_messages_unless_the_recipe_says_otherwise(tmp_path):
    """edgetune simulate keeps 4 x the concurrently running sites in flight (at least 8) unless the recipe or
    --set chose run.in_flight (0 included: every message at once); the value passes the config's checks."""
    assert sim_in_flight(1, cpu_count=2) == 8 and sim_in_flight(1, cpu_count=16) == 64
    assert sim_in_flight(4, cpu_count=16) == 16 and sim_in_flight(8, cpu_count=2) == 8
    flat = cfgmod.load_recipe(RECIPE, [f"run.dir={tmp_path}"])
    windowed = with_sim_in_flight(flat, 1)
    assert windowed["run.in_flight"] == sim_in_flight(1) and "run.in_flight" not in flat
    assert cfgmod.from_run_config(windowed).run.in_flight == sim_in_flight(1)
    for chosen in (0, 3):
        given = cfgmod.load_recipe(RECIPE, [f"run.dir={tmp_path}", f"run.in_flight={chosen}"])
        assert with_sim_in_flight(given, 1)["run.in_flight"] == chosen
    with pytest.raises(ValueError, match="run.in_flight must be >= 0"):
        cfgmod.from_run_config({**flat, "run.in_flight": -1})


def _fake_supernode(tmp_path, body: str) -> list[str]:
    script = tmp_path / "supernode.py"
    script.write_text("import os, subprocess, sys, time\n" + body)
    return [sys.executable, str(script)]


def test_a_refused_activation_is_retried_while_time_is_left(tmp_path, monkeypatch, capsys):
    # Prepare: a SuperNode the SuperLink refuses once (an earlier session still open), then accepts
    monkeypatch.setattr(site_driver, "ACTIVATION_RETRY_S", 0.05)
    counter = tmp_path / "runs.txt"
    cmd = _fake_supernode(
        tmp_path,
        f"p = {str(counter)!r}\nn = int(open(p).read()) if os.path.exists(p) else 0\nopen(p, 'w').write(str(n + 1))\n"
        "print('Failed to activate SuperNode' if n == 0 else 'node active', flush=True)\n"
        "sys.exit(1 if n == 0 else 0)\n",
    )
    handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    # Execute
    code = site_driver.supervise_supernode(cmd, dict(os.environ), activation_wait=30.0)
    # Assert: retried once, exit code of the accepted run, both logs passed through, handlers restored
    out = capsys.readouterr().out
    assert code == 0 and counter.read_text() == "2"
    assert "Failed to activate SuperNode" in out and "node active" in out and "retrying" in out
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_a_refusal_without_time_left_names_the_likely_cause_and_returns_its_code(tmp_path, capsys):
    cmd = _fake_supernode(tmp_path, "print('Failed to activate SuperNode', flush=True)\nsys.exit(3)\n")
    code = site_driver.supervise_supernode(cmd, dict(os.environ), activation_wait=0.0)
    out = " ".join(capsys.readouterr().out.split())
    assert code == 3 and "the SuperLink refuses this node: is its node.pub registered" in out


def test_the_supernodes_whole_process_group_is_stopped(tmp_path):
    """A SuperExec-like child the SuperNode leaves behind is killed with its group when the SuperNode exits."""
    pid_file = tmp_path / "child.pid"
    cmd = _fake_supernode(
        tmp_path,
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\nprint('started', flush=True)\n",
    )
    assert site_driver.supervise_supernode(cmd, dict(os.environ), activation_wait=0.0) == 0
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the SuperNode's child outlived the site")


def test_a_simulation_attaches_to_a_ray_cluster_only_with_portable_sites(tmp_path, monkeypatch):
    """Flower's Ray backend calls ray.init() without an address, which joins a cluster started with
    `ray start` on this machine or named by RAY_ADDRESS. Without a cluster address the simulation pins
    RAY_ADDRESS=local whatever the environment says; with one, sites must be portable (their kits and
    state travel with the run), and turning that off is refused naming the address."""
    from edgetune import simulate

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert simulate.ray_cluster() == "" and simulate.flwr_env(tmp_path)["RAY_ADDRESS"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert simulate.ray_cluster() == "" and simulate.flwr_env(tmp_path)["RAY_ADDRESS"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.7:6379")
    assert simulate.ray_cluster() == "10.0.0.7:6379"
    assert simulate.ray_cluster("10.0.0.8:6379") == "10.0.0.8:6379"  # --ray-address wins
    assert simulate.flwr_env(tmp_path, "10.0.0.7:6379")["RAY_ADDRESS"] == "10.0.0.7:6379"
    assert simulate.with_cluster({}, "10.0.0.7:6379")["run.portable_sites"] is True
    assert simulate.with_cluster({}, "") == {}
    with pytest.raises(ValueError, match="10.0.0.7:6379"):
        simulate.with_cluster({"run.portable_sites": False}, "10.0.0.7:6379")
    result = CliRunner().invoke(
        cli.app,
        ["simulate", RECIPE, "--sites", "3", "--set", f"run.dir={tmp_path}/runs", "--set", "run.portable_sites=false"],
    )
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "run.portable_sites" in output and "10.0.0.7:6379" in output
    assert not any((tmp_path / "runs").glob("*/metrics.jsonl"))  # refused before any run started


def test_a_quorum_of_all_the_sites_the_command_line_asks_for_is_valid(tmp_path):
    """``--sites N`` counts before the config's quorum check: ``--set run.min_sites=N`` with N above the
    recipe's run.num_sites (4) runs (it was refused as 'more than run.num_sites = 4', which broke the
    documented 1000-site command and the many_sites benchmark), for ``edgetune simulate`` and for
    ``python -m edgetune.inproc``; a quorum above --sites is still refused."""
    from edgetune import inproc

    argv = ["simulate", RECIPE, "--sites", "6", "--rounds", "1", "--engine", "inproc"]
    sets = ["--set", "run.min_sites=6", "--set", f"run.dir={tmp_path}/runs"]
    result = CliRunner().invoke(cli.app, argv + sets)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"round": 1' in line]
    assert metrics and '"num_accepted": 6' in metrics[0]
    assert inproc.main([RECIPE, "num_rounds=1", "run.min_sites=5", f"run.dir={tmp_path}/in", "--sites", "5"]) == 0
    result = CliRunner().invoke(cli.app, [*argv[:3], "5", *argv[4:], *sets])
    flat = "".join(result.output.split())
    assert result.exit_code == 1 and "run.min_sites=6ismorethanrun.num_sites=5" in flat

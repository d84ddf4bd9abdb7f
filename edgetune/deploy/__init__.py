"""Real deployments on Flower's deployment engine: SuperLink, SuperNodes, ``flwr run``.

``edgetune server`` starts (or connects to) a SuperLink with TLS, SuperNode authentication and a
persistent database, registers every site's node key, submits the run and follows it
(``server.py``). ``edgetune site`` starts one SuperNode with its site kit and data and supervises it
(``site.py``); ``edgetune keys``/``certs`` make the key folder (``kits.py``). They drive Flower's own
commands (``commands.py``, re-exported here); nothing here opens a socket of its own.
"""

from edgetune.deploy.commands import (
    CONNECTION,
    DeployError,
    Managed,
    flower_env,
    flwr,
    is_loopback,
    register_sites,
    run_status,
    split_address,
    submit_run,
    superlink_command,
    supernode_command,
    wait_healthy,
    write_cli_config,
)

__all__ = [
    "CONNECTION",
    "DeployError",
    "Managed",
    "flower_env",
    "flwr",
    "is_loopback",
    "register_sites",
    "run_status",
    "split_address",
    "submit_run",
    "superlink_command",
    "supernode_command",
    "wait_healthy",
    "write_cli_config",
]

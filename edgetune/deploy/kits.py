"""``edgetune keys`` and ``edgetune certs``: the server team's key folder and one kit per site.

``keys`` makes the server's signing key, the registry of site public keys and a kit per site
(``edgetune/crypto/keys.py``); ``certs`` adds TLS (a private CA and the SuperLink certificate) and
Flower's node-authentication keys (``edgetune/crypto/certs.py``), keeping what already exists unless
told to overwrite it, so it can run again after sites were added.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetune.deploy.commands import DeployError
from edgetune.live import console


def make_keys(out_dir: Path, sites: str, *, add: bool, overwrite: bool) -> None:
    """Generate (or, with ``add``, extend) the key folder for the comma-separated ``sites``; print where."""
    from edgetune.crypto import keys as keymod

    site_ids = [s.strip() for s in sites.split(",") if s.strip()]
    if not site_ids:
        raise DeployError("--sites names no site")
    try:
        if add:
            keymod.add_sites(out_dir, site_ids)
        else:
            keymod.generate(out_dir, site_ids, overwrite=overwrite)
    except ValueError as err:
        raise DeployError(str(err)) from err
    console.print(f"server key:   {out_dir / 'server'} (keep private)")
    console.print(f"registry:     {out_dir / 'registry.json'} (site public keys, for the server)")
    for s in site_ids:
        console.print(f"site kit:     {keymod.site_kit_dir(out_dir, s)} (give to {s})")


def make_certs(keys_dir: Path, hosts: str, *, overwrite: bool) -> None:
    """TLS for the SuperLink at ``hosts`` and a node key for every kit that lacks one; print what was kept."""
    from edgetune.crypto import certs as certmod
    from edgetune.crypto.keys import site_kit_dir

    if not (keys_dir / "registry.json").is_file():
        raise DeployError(f"no site registry in {keys_dir}: run `edgetune keys {keys_dir} --sites ...` first")
    try:
        sites = sorted(json.loads((keys_dir / "registry.json").read_text())["sites"])
        host_list = [h.strip() for h in hosts.split(",") if h.strip()]
        ca_kept = (certmod.tls_dir(keys_dir) / "ca.crt").exists() and not overwrite
        if not ca_kept:
            certmod.generate_tls(keys_dir, host_list, overwrite=overwrite)
        new = [s for s in sites if overwrite or not (site_kit_dir(keys_dir, s) / "node.key").exists()]
        certmod.generate_node_keys(keys_dir, new, overwrite=overwrite)
    except (ValueError, OSError, KeyError) as err:
        raise DeployError(str(err)) from err
    kept = " (kept; --overwrite replaces it)" if ca_kept else ""
    console.print(f"CA:         {certmod.tls_dir(keys_dir) / 'ca.crt'} (ca.key: keep offline){kept}")
    console.print(f"SuperLink:  {certmod.tls_dir(keys_dir) / 'superlink.crt'}{kept or f' for {hosts}'}")
    for site in sites:
        what = "new node key" if site in new else "node key kept"
        console.print(f"site kit:   {keys_dir / 'sites' / site} ({what}; node.key, node.pub, ca.crt)")

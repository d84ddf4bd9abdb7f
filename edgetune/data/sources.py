"""Which examples each site trains on and which the server evaluates on.

Simulation: site ``i`` of ``N`` gets demo site ``i`` (``data.source = "demo"``, ``"triage"`` or ``"docs"``) or partition
``i`` of ``data.path`` (``natural``/``iid``/``dirichlet``). Deployment: a site's node config
``data-path`` names its own data file (any format ``data/files.py`` reads). The server evaluates on
the demo held-out questions, on ``data.eval_path``, or on a keyed 10% split of ``data.path`` that the
sites then exclude.

Every example leaves here with its system prompt decided (``"system"``: the row's own, else
``data.system_prompt``, else the source's default; ``""`` means none) and, when the recipe sets
``data.prompt_template``, that template (``"template"``).

Splitting a data file across simulated sites uses flwr-datasets' partitioners, which live with the Flower
glue (``edgetune/flower/partition.py``); the caller passes one in (``edgetune/build.py`` does), so nothing
under ``data/`` imports Flower.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from edgetune.config import RunConfig
from edgetune.crypto import schedule
from edgetune.data import realtext
from edgetune.data.demo import demo_heldout, demo_site
from edgetune.data.files import load_examples
from edgetune.data.prompts import SYSTEM_PROMPT as DEMO_SYSTEM_PROMPT
from edgetune.data.triage import SYSTEM_PROMPT as TRIAGE_SYSTEM_PROMPT
from edgetune.data.triage import triage_heldout, triage_site

EVAL_FRACTION = 0.1


class Partitioner(Protocol):
    """Splits ``rows`` into ``num_partitions`` site partitions (``edgetune.flower.partition.partition``)."""

    def __call__(
        self, rows: Sequence[Mapping[str, Any]], num_partitions: int, *, method: str, by: str, alpha: float, seed: int
    ) -> list[list[dict[str, Any]]]: ...


def _load(cfg: RunConfig, path: str) -> list[dict]:
    return load_examples(path, columns=cfg.data.column_map)


def _split_path(cfg: RunConfig) -> tuple[list[dict], list[dict]]:
    rows = _load(cfg, cfg.data.path)
    if cfg.data.eval_path:
        return rows, _load(cfg, cfg.data.eval_path)
    order = schedule.permutation(schedule.derive(schedule.run_key(cfg.run.seed), "partition", "eval-split"), len(rows))
    n_eval = max(1, int(len(rows) * EVAL_FRACTION))
    held = {int(i) for i in order[:n_eval]}
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [rows[i] for i in sorted(held)]


def site_examples(
    cfg: RunConfig, site_index: int, num_sites: int, data_path: str = "", *, partitioner: Partitioner | None = None
) -> list[dict]:
    """Training examples of one site.

    Parameters
    ----------
    cfg
        The run configuration.
    site_index
        0-based position of the site (Flower's ``partition-id`` in simulation).
    num_sites
        Number of sites the data is split over.
    data_path
        A site's own data file or folder (deployment); overrides ``data.source``.
    partitioner
        Splits ``data.path`` across the sites (``data.source = "file"`` without ``data_path``);
        ``ValueError`` when that split is needed and none is given.

    Returns
    -------
    list[dict]
        Examples with ``instruction`` and ``response``.
    """
    if data_path:
        return _with_system(cfg, _load(cfg, data_path))
    if not 0 <= site_index < num_sites:
        raise ValueError(f"site index {site_index} out of range for {num_sites} sites")
    if cfg.data.source == "demo":
        site = demo_site(site_index, num_sites, facts_per_site=cfg.data.demo_facts, seed=cfg.run.seed)
        return _with_system(cfg, list(site.train))
    if cfg.data.source == "triage":
        return _with_system(cfg, list(triage_site(site_index, num_sites, seed=cfg.run.seed).train))
    if cfg.data.source == "docs":
        return _with_system(cfg, realtext.docs_site(site_index, seed=cfg.run.seed))
    if partitioner is None:
        raise ValueError(
            f"data.source = {cfg.data.source!r} splits data.path {cfg.data.path} across {num_sites} sites: "
            "site_examples needs a partitioner (edgetune.flower.partition.partition) or the site's own data_path"
        )
    train, _ = _split_path(cfg)
    parts = partitioner(
        train,
        num_sites,
        method=cfg.data.partition,
        by=cfg.data.partition_by,
        alpha=cfg.data.dirichlet_alpha,
        seed=cfg.run.seed,
    )
    return _with_system(cfg, parts[site_index])


def heldout_examples(cfg: RunConfig, num_sites: int) -> list[dict]:
    """The server's held-out set (first ``eval.num_examples``)."""
    if cfg.data.source == "demo":
        rows = demo_heldout(num_sites, facts_per_site=cfg.data.demo_facts, seed=cfg.run.seed)
    elif cfg.data.source == "triage":
        rows = triage_heldout(num_sites, seed=cfg.run.seed)
    elif cfg.data.source == "docs":
        rows = realtext.docs_heldout(num_sites, seed=cfg.run.seed)
    else:
        _, rows = _split_path(cfg)
    return _with_system(cfg, list(rows[: cfg.eval.num_examples]))


def system_prompt(cfg: RunConfig) -> str:
    """The system prompt of examples without their own: ``data.system_prompt``, else the source's
    (demo: the factory assistant, triage: the report router, docs: the technical writer, your own
    data: ``""``, none).
    """
    if cfg.data.system_prompt:
        return cfg.data.system_prompt
    defaults = {"demo": DEMO_SYSTEM_PROMPT, "triage": TRIAGE_SYSTEM_PROMPT, "docs": realtext.SYSTEM_PROMPT}
    return defaults.get(cfg.data.source, "")


def _with_system(cfg: RunConfig, rows: list[dict]) -> list[dict]:
    default = system_prompt(cfg)
    extra = {"template": cfg.data.prompt_template} if cfg.data.prompt_template else {}
    return [{**row, "system": row.get("system") or default, **extra} for row in rows]

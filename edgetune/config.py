"""One configuration tree for a run: ``RunConfig``.

Every key is a dotted field path (``spsa.num_probes``) with a scalar value, so the same
spelling works in recipes (TOML tables), in Flower's ``[tool.flwr.app.config]`` and on
the command line (``spsa.lr=1e-5``). Lists travel as comma-separated strings.

``flatten(RunConfig())`` must equal the ``[tool.flwr.app.config]`` table of
``pyproject.toml`` (Flower rejects undeclared keys); ``python -m edgetune.config``
prints that table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetune import schedules

Scalar = bool | int | float | str


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _is_power_of_two(x: float) -> bool:
    if x <= 0 or not math.isfinite(x):
        return False
    mantissa, _ = math.frexp(x)
    return mantissa == 0.5


def check_gpus_per_site(value: float, name: str) -> float:
    """Flower's Ray backend takes a fraction of one GPU (0 < f <= 1) or a whole number of GPUs."""
    v = float(value)
    if not (math.isfinite(v) and v >= 0 and (v <= 1 or v.is_integer())):
        raise ValueError(f"{name} must be 0, a fraction in (0, 1] or a whole number of GPUs, got {value!r}")
    return v


def device_list(spec: str) -> tuple[str, ...]:
    """``model.device`` as a list: ``cuda:0,cuda:1`` names several devices of one site."""
    devices = _csv(spec)
    if not devices:
        raise ValueError("model.device must not be empty (auto, cpu, cuda[:N] or a comma-separated list)")
    if len(devices) > 1 and "auto" in devices:
        raise ValueError(f"model.device: 'auto' cannot be part of a device list, got {spec!r}")
    return devices


@dataclass(frozen=True, kw_only=True)
class RunSection:
    """Where a run writes, how it is keyed, and how rounds close."""

    name: str = ""
    """Run id (folder name under ``dir``); empty picks ``<algorithm>-<UTC time>``."""
    dir: str = "runs"
    """Parent folder of run folders. Relative paths are taken from the working directory."""
    seed: int = 0
    """Key for the non-secret streams (data order, partitions, initialisation)."""
    num_sites: int = 0
    """Sites the server waits for before round 1 (0: all connected once the count is stable)."""
    min_sites: int = 1
    """Quorum: a round commits when at least this many replies are valid."""
    round_timeout_s: float = 600.0
    """Deadline for one exchange of a round; replies after it are stale."""
    quorum_grace_s: float = 30.0
    """Once ``min_sites`` sites have answered, wait at most this long for the others, then close
    the exchange (their late replies are counted as stale and never applied)."""
    checkpoint_every: int = 0
    """Write a checkpoint every N rounds (0: only after the last round)."""
    keep_checkpoints: int = 2
    """How many checkpoint folders to keep (the newest ones)."""
    sites_per_round: float = 0.0
    """Sites asked per round: 0 for all, a fraction in (0, 1) of the connected sites, or a whole
    number of sites (at least ``min_sites``). The sample comes from the keyed ``sites`` stream of
    ``run.seed`` and the round number, so a resumed run asks the same sites."""
    gpus_per_site: float = 0.0
    """Simulation: GPUs Flower's backend reserves per simulated site (fractional ``num-gpus``
    client resources: 0.25 puts four sites on each GPU). 0: simulated sites run on the CPU
    unless ``model.device`` names a GPU explicitly."""
    track: str = ""
    """Also export the per-round metrics to experiment trackers: ``tensorboard`` (event files in
    ``<run>/tensorboard``; needs the tensorboard package), ``wandb`` (needs wandb; offline unless
    ``WANDB_MODE`` says otherwise), or both, comma-separated; empty: off."""

    def __post_init__(self) -> None:
        if self.num_sites < 0:
            raise ValueError(f"run.num_sites must be >= 0, got {self.num_sites}")
        if self.min_sites < 1:
            raise ValueError(f"run.min_sites must be >= 1, got {self.min_sites}")
        if self.round_timeout_s <= 0:
            raise ValueError(f"run.round_timeout_s must be > 0, got {self.round_timeout_s}")
        if self.quorum_grace_s < 0:
            raise ValueError(f"run.quorum_grace_s must be >= 0, got {self.quorum_grace_s}")
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("run.checkpoint_every must be >= 0 and run.keep_checkpoints >= 1")
        if "/" in self.name or self.name in {".", ".."}:
            raise ValueError(f"run.name must be a plain folder name, got {self.name!r}")
        spr = self.sites_per_round
        if not (math.isfinite(spr) and spr >= 0 and (spr < 1 or float(spr).is_integer())):
            raise ValueError(
                f"run.sites_per_round must be 0 (all), a fraction in (0, 1) or a whole number of sites, got {spr!r}"
            )
        check_gpus_per_site(self.gpus_per_site, "run.gpus_per_site")
        unknown = sorted(set(_csv(self.track)) - {"tensorboard", "wandb"})
        if unknown:
            raise ValueError(f"run.track: unknown tracker(s) {unknown}; use tensorboard, wandb or both")


@dataclass(frozen=True, kw_only=True)
class ModelSection:
    """Which causal LM to fine-tune and which of its parameters train."""

    path: str = "smollm2"
    """``smollm2`` (the embedded SmolLM2-135M-Instruct), ``tiny`` (an in-memory 2-layer Llama
    for tests), a local folder that ``AutoModelForCausalLM.from_pretrained`` can read, or a
    Hugging Face model id (``org/name``) already in the local Hugging Face cache (never downloaded).
    In deployment a site's node config ``model-path`` points at its own copy."""
    revision: str = ""
    """For a model id: the cached revision (branch, tag or commit) to use; empty: ``main``."""
    dtype: str = "float32"
    """Weights dtype, applied while loading (no fp32 copy first): float32, bfloat16, float16, or
    ``auto`` (the dtype the model's config.json names). spsa needs float32 (see ``RunConfig``)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu`` or ``cuda[:N]``; or several devices of one site,
    comma-separated (``cuda:0,cuda:1``): spsa spreads each step's probes across replicas on them
    (same bytes and state hash as one device); the other algorithms refuse a list."""
    trainable: str = "q_proj,k_proj,v_proj,o_proj"
    """``all``, ``lora`` (LoRA adapters on ``target_modules``; A and B train), ``lora-b`` (LoRA
    adapters, only B trains: A keeps its keyed initialisation, which every replica derives from
    ``run.seed``, so A is never sent), or comma-separated substrings of parameter names."""
    target_modules: str = "q_proj,v_proj"
    """LoRA target modules (comma-separated), used when ``trainable`` is ``lora`` or ``lora-b``."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha (scaling = alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout."""
    lora_layers: str = ""
    """Decoder blocks that get LoRA adapters: empty for all, or an inclusive range ``"first-last"``
    (peft's ``layers_to_transform``). With spsa, adapters on the top blocks only let each probe
    rerun just those blocks (``models/suffix.py``)."""
    cache_dir: str = ""
    """Where the converted SmolLM2 folder is cached; empty: ``$EDGETUNE_CACHE`` or
    ``~/.cache/edgetune``."""
    sha256: str = ""
    """Fingerprint every copy of the base model must have (``edgetune fingerprint``); empty: not
    checked. ``edgetune server`` fills it in from its own copy, so a site whose ``model-path``
    holds another model is refused before it trains."""
    quantize: str = "none"
    """Base weights of the sites' training copies: ``none``, ``4bit`` (QLoRA, NF4) or ``8bit``
    (bitsandbytes, CUDA only; ``pip install 'edgetune[gpu]'``). Needs ``trainable = "lora"``. The
    server keeps its copy unquantised; a site's node config ``quantize`` overrides it."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (backprop algorithms): less memory, ~30% slower."""
    autocast: str = "none"
    """Mixed precision of local training (backprop algorithms): ``none``, ``bf16`` or ``fp16``
    (``torch.autocast``; trainable weights stay in their dtype, fp16 adds a gradient scaler).
    fp16 needs CUDA."""

    def __post_init__(self) -> None:
        if self.dtype not in {"float32", "bfloat16", "float16", "auto"}:
            raise ValueError(f"model.dtype must be float32, bfloat16, float16 or auto, got {self.dtype!r}")
        if not self.path.strip():
            raise ValueError("model.path must not be empty")
        if not self.trainable.strip():
            raise ValueError("model.trainable must not be empty")
        device_list(self.device)
        if self.lora_rank < 1:
            raise ValueError(f"model.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.sha256 and (len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)):
            raise ValueError(f"model.sha256 must be 64 lowercase hex digits (edgetune fingerprint): {self.sha256!r}")
        if self.quantize not in {"none", "4bit", "8bit"}:
            raise ValueError(f"model.quantize must be none, 4bit or 8bit, got {self.quantize!r}")
        if self.quantize != "none" and self.trainable.strip() != "lora":
            raise ValueError(
                f"model.quantize = {self.quantize!r} freezes quantised base weights: it needs model.trainable = 'lora'"
            )
        if self.autocast not in {"none", "bf16", "fp16"}:
            raise ValueError(f"model.autocast must be none, bf16 or fp16, got {self.autocast!r}")
        _ = self.lora_layer_list  # validates the spelling

    @property
    def target_module_list(self) -> tuple[str, ...]:
        return _csv(self.target_modules)

    @property
    def lora_layer_list(self) -> tuple[int, ...] | None:
        """The blocks of ``lora_layers`` (None: all blocks)."""
        text = self.lora_layers.strip()
        if not text:
            return None
        first, sep, last = text.partition("-")
        try:
            lo, hi = int(first), int(last if sep else first)
        except ValueError as err:
            raise ValueError(f"model.lora_layers must be empty or 'first-last', got {self.lora_layers!r}") from err
        if not 0 <= lo <= hi:
            raise ValueError(f"model.lora_layers must be a range 0 <= first <= last, got {self.lora_layers!r}")
        return tuple(range(lo, hi + 1))

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        return _csv(self.trainable)


@dataclass(frozen=True, kw_only=True)
class DataSection:
    """Where each site's examples come from and how they are batched."""

    source: str = "demo"
    """``demo`` (the built-in fact-recall data: alarm codes -> procedures), ``triage`` (the built-in
    fault-report routing data: report -> one of the site's categories), ``docs`` (real technical
    prose: the docstrings of transformers, datasets, peft and flwr, one package per site) or ``file``:
    your own data in ``path`` (``jsonl`` is the same, kept for old recipes)."""
    path: str = ""
    """Your data for ``source = "file"``: a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file, or a
    folder written by ``datasets``' ``save_to_disk`` (read offline with ``datasets``). Rows are
    ``instruction``/``response``, ``text`` or chat ``messages`` (see ``columns``). In deployment each
    site's node config ``data-path`` overrides it."""
    eval_path: str = ""
    """Held-out data for the server's evaluation (same formats as ``path``); empty: split off ``path``."""
    columns: str = ""
    """Column mapping, ``field=column`` pairs, comma-separated: ``"instruction=question,response=answer"``.
    Fields: instruction, response, text, messages, system. Unmapped fields use their own name."""
    prompt_template: str = ""
    """Prompt text for instruction rows with ``{instruction}`` and optionally ``{system}``
    (``"### Question:\\n{instruction}\\n### Answer:\\n"``); empty: the model's chat template, or
    that built-in layout when the tokenizer has none. Chat ``messages`` always use the chat template."""
    partition: str = "natural"
    """Simulation split of ``path``: ``natural`` (one partition per value of ``partition_by``,
    the demo's own sites), ``iid`` or ``dirichlet`` (flwr-datasets partitioners)."""
    partition_by: str = "site"
    """Column used by the natural and Dirichlet partitioners."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partitioner (smaller: more skewed)."""
    demo_facts: int = 24
    """Demo data: alarm facts per site."""
    max_length: int = 96
    """Token limit per example (prompt + answer); longer examples are cut from the left."""
    batch_size: int = 8
    """Examples per local step."""
    system_prompt: str = ""
    """System prompt of examples that carry none of their own (a ``system`` column or a system
    message); empty: the source's own (``demo``: a factory maintenance assistant; ``triage``: a
    fault-report router; ``docs``: a documentation writer; your own data: no system prompt, so the
    chat template's default applies)."""

    def __post_init__(self) -> None:
        if self.source not in {"demo", "triage", "docs", "file", "jsonl"}:
            raise ValueError(f"data.source must be demo, triage, docs or file, got {self.source!r}")
        if self.source in {"file", "jsonl"} and not self.path:
            raise ValueError(f"data.source = {self.source!r} needs data.path")
        if self.partition not in {"natural", "iid", "dirichlet"}:
            raise ValueError(f"data.partition must be natural, iid or dirichlet, got {self.partition!r}")
        if self.dirichlet_alpha <= 0:
            raise ValueError(f"data.dirichlet_alpha must be > 0, got {self.dirichlet_alpha}")
        if self.batch_size < 1 or self.max_length < 8 or self.demo_facts < 1:
            raise ValueError("data.batch_size >= 1, data.max_length >= 8 and data.demo_facts >= 1 required")
        self.column_map  # noqa: B018 (validates the mapping)
        if self.prompt_template:
            check_prompt_template(self.prompt_template)

    @property
    def column_map(self) -> dict[str, str]:
        """``{field: column}`` from ``columns`` (only the mapped fields)."""
        out: dict[str, str] = {}
        for pair in _csv(self.columns):
            field_name, sep, column = (x.strip() for x in pair.partition("="))
            if not sep or not field_name or not column:
                raise ValueError(f"data.columns: {pair!r} is not field=column (e.g. 'response=answer')")
            if field_name not in DATA_FIELDS:
                raise ValueError(f"data.columns: unknown field {field_name!r} (one of {', '.join(DATA_FIELDS)})")
            if field_name in out:
                raise ValueError(f"data.columns maps {field_name!r} twice")
            out[field_name] = column
        return out


DATA_FIELDS = ("instruction", "response", "text", "messages", "system")
"""Fields an example is read from (``data.columns`` maps them to a file's own column names)."""


def check_prompt_template(template: str) -> None:
    """Raise ``ValueError`` unless ``template`` has ``{instruction}`` and no placeholder but ``{system}``."""
    import string

    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"data.prompt_template is not a valid template ({err}); literal braces are {{{{ }}}}") from err
    unknown = sorted({n for n in names if n not in {"instruction", "system"}})
    if unknown:
        raise ValueError(f"data.prompt_template: unknown placeholder(s) {unknown}; only {{instruction}} and {{system}}")
    if "instruction" not in names:
        raise ValueError("data.prompt_template must contain {instruction}")


@dataclass(frozen=True, kw_only=True)
class EvalSection:
    """Held-out evaluation on the server after each round."""

    every_rounds: int = 1
    """Held-out loss every N rounds (and always after round 0 and the last round)."""
    accuracy_every_rounds: int = 0
    """Greedy exact-match accuracy every N rounds (0: only round 0 and the last round)."""
    num_examples: int = 64
    """Held-out examples evaluated (the first N of the held-out set)."""
    batch_size: int = 16
    """Evaluation batch size."""
    max_new_tokens: int = 24
    """Greedy decoding length for exact-match accuracy."""

    def __post_init__(self) -> None:
        if self.every_rounds < 1 or self.accuracy_every_rounds < 0:
            raise ValueError("eval.every_rounds must be >= 1 and eval.accuracy_every_rounds >= 0")
        if self.num_examples < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("eval.num_examples, eval.batch_size and eval.max_new_tokens must be >= 1")


@dataclass(frozen=True, kw_only=True)
class CryptoSection:
    """Seed envelopes (DESIGN.md section 3)."""

    keys_dir: str = ""
    """Key material from ``edgetune keys``; empty in simulation: generated into the run folder."""
    deterministic_secrets: bool = False
    """Derive round secrets from ``run.seed`` instead of ``os.urandom`` (tests, reproducible
    simulations only: anyone who knows the seed can predict every perturbation)."""
    envelope_ttl_s: float = 3600.0
    """Envelopes expire this long after sealing."""
    max_skip: int = 1000
    """Sites reject envelopes more than this many rounds ahead of their last accepted round."""

    def __post_init__(self) -> None:
        if self.envelope_ttl_s <= 0 or self.max_skip < 1:
            raise ValueError("crypto.envelope_ttl_s must be > 0 and crypto.max_skip >= 1")


@dataclass(frozen=True, kw_only=True)
class SpsaSection:
    """Shared-seed SPSA (Just One Byte, MeZO, FedKSeed); see ``algorithms/spsa/``.

    How lr, probes and batch relate: one step moves theta by ``lr * mean_p(g_p z_p)`` (averaged
    over the P probes and, with ``normalizer = "mean"``, over the N sites), where g_p ~ grad . z_p
    has the size of the gradient's norm and z_p has d entries of +-1. More probes average more
    directions at the same lr (the step's noise shrinks as 1/sqrt(N P)); a bigger batch lowers the
    noise of each g_p. The stable lr falls roughly as 1/d with the number d of perturbed values:
    LoRA-B (d ~ 10^5) takes lr ~ 1e-3..1e-2, attention projections (d ~ 2.6e7) ~ 1e-5..1e-4.
    """

    eps: float = 2.0**-10
    """Perturbation scale; a power of two so that eps*z is exact (MeZO's zo_eps)."""
    lr: float = 3e-5
    """Learning rate applied to the projected-gradient scalars."""
    lr_schedule: str = "constant"
    """lr across rounds (``edgetune/schedules.py``: ``constant``, ``cosine[:floor]``, ``linear``,
    ``inverse``, ``step``...). The server puts each round's lr in its plan and its replay log, so
    replicas and catch-up apply the same value. ZO steps add noise in every perturbed direction:
    a decaying lr stops that noise from undoing late progress (docs/algorithms/spsa.md)."""
    num_steps: int = 4
    """K: local SPSA steps per site per round."""
    num_probes: int = 1
    """P: probes (perturbation directions) per step; the uplink is K*P bytes (+ framing)."""
    difference: str = "central"
    """``central``: [L(w+eps z) - L(w-eps z)] / 2eps, two forwards per probe; ``forward``:
    [L(w+eps z) - L(w)] / eps, the P probes of a step share one base pass (P + 1 forwards)."""
    normalizer: str = "mean"
    """``mean``: the update averages the N*P scalars of a step (lr / (N P)); ``sqrt``: Just One
    Byte's lr / sqrt(N P)."""
    directions: str = "per-site"
    """``per-site``: every site draws its own directions; ``shared``: all sites evaluate the same
    K*P directions and each coordinate is aggregated across sites (robust aggregators need it)."""
    seed_pool: int = 0
    """FedKSeed: draw every probe from a pool of this many seeds (0: off); see ``pool_scope``."""
    pool_scope: str = "round"
    """``round``: a new pool every round; ``run``: one fixed pool for the whole run, so the model is
    the base plus S integer coefficients (catch-up and ``edgetune export --delta`` in kilobytes)
    and ``optimizer`` can keep momentum on them."""
    optimizer: str = "sgd"
    """Server-side optimizer on the run-scope pool's coefficients: ``sgd``, ``momentum`` or
    ``adam`` (every replica computes it from the committed codes; no extra bytes)."""
    momentum: float = 0.9
    """Momentum (``momentum``) or beta1 (``adam``)."""
    adam_beta2: float = 0.999
    """Adam's beta2."""
    adam_eps: float = 1e-8
    """Adam's denominator floor, in the units of g / D."""
    sparse_frac: float = 0.0
    """Sparse MeZO: perturb only this fraction of each trainable tensor, its smallest-magnitude
    base weights (0: all). The mask is a function of the run's base weights, so every replica
    derives the same one."""
    scalar_codec: str = "int8-sr"
    """One byte per scalar: ``int8-sr`` (linear, stochastic rounding, unbiased inside the clip)
    or ``log8`` (sign + 7-bit log magnitude)."""
    scale: float = 8.0
    """Initial clip of the scalars |g| (codes cover [-scale, scale]); adapted each round."""
    scale_quantile: float = 0.9
    """The next round's clip is ``scale_mult`` x this quantile of the accepted |g|."""
    scale_mult: float = 2.0
    """See ``scale_quantile``; the clip moves at most x4 per round."""
    aggregator: str = "mean"
    """Across sites, per coordinate (``shared`` directions only): mean, trimmed or median."""
    trim_frac: float = 0.125
    """Fraction trimmed from each side by the trimmed mean."""
    snapshot_after: int = 50
    """A site more rounds behind than this gets a signed snapshot (fp32 weights; with a run-scope
    pool its coefficients, sent whenever they are smaller than the log) instead of the replay log."""
    round_start: str = "auto"
    """Where the round-start weights live while a site perturbs its copy: ``host`` memory,
    ``disk`` (a safetensors file read back per tensor), or ``auto`` (disk on CPU, host on GPU)."""

    def __post_init__(self) -> None:
        if not _is_power_of_two(self.eps):
            raise ValueError(f"spsa.eps must be a power of two (e.g. 0.0009765625 = 2^-10), got {self.eps}")
        if self.lr <= 0 or self.num_steps < 1 or self.num_probes < 1:
            raise ValueError("spsa.lr must be > 0, spsa.num_steps and spsa.num_probes >= 1")
        schedules.parse(self.lr_schedule, key="spsa.lr_schedule")
        if self.num_steps * self.num_probes > 1 << 16:
            raise ValueError("spsa.num_steps x spsa.num_probes must be at most 65536 (one byte each)")
        if self.difference not in {"central", "forward"}:
            raise ValueError(f"spsa.difference must be central or forward, got {self.difference!r}")
        if self.normalizer not in {"mean", "sqrt"}:
            raise ValueError(f"spsa.normalizer must be mean or sqrt, got {self.normalizer!r}")
        if self.directions not in {"per-site", "shared"}:
            raise ValueError(f"spsa.directions must be per-site or shared, got {self.directions!r}")
        if not 0 <= self.seed_pool <= 1 << 20:
            raise ValueError(f"spsa.seed_pool must be in [0, 2^20], got {self.seed_pool}")
        if self.pool_scope not in {"round", "run"}:
            raise ValueError(f"spsa.pool_scope must be round or run, got {self.pool_scope!r}")
        if self.pool_scope == "run" and self.seed_pool < 1:
            raise ValueError("spsa.pool_scope = 'run' needs spsa.seed_pool >= 1")
        if self.optimizer not in {"sgd", "momentum", "adam"}:
            raise ValueError(f"spsa.optimizer must be sgd, momentum or adam, got {self.optimizer!r}")
        if self.optimizer != "sgd" and self.pool_scope != "run":
            raise ValueError(
                "spsa.optimizer momentum/adam runs on a run-scope pool's coefficients: "
                "set spsa.pool_scope = 'run' and spsa.seed_pool > 0"
            )
        if not 0 <= self.momentum < 1 or not 0 <= self.adam_beta2 < 1 or not 0 < self.adam_eps < 1:
            raise ValueError("spsa.momentum and spsa.adam_beta2 must be in [0, 1), spsa.adam_eps in (0, 1)")
        if not 0 <= self.sparse_frac < 1:
            raise ValueError(f"spsa.sparse_frac must be in [0, 1), got {self.sparse_frac}")
        if not 0 <= self.snapshot_after <= 200:
            raise ValueError(f"spsa.snapshot_after must be in [0, 200] (the longest log), got {self.snapshot_after}")
        if self.scalar_codec not in {"int8-sr", "log8"}:
            raise ValueError(f"spsa.scalar_codec must be int8-sr or log8, got {self.scalar_codec!r}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"spsa.scale must be a finite positive number, got {self.scale}")
        if not 0 < self.scale_quantile <= 1 or self.scale_mult <= 0:
            raise ValueError("spsa.scale_quantile must be in (0, 1] and spsa.scale_mult > 0")
        if self.aggregator not in {"mean", "trimmed", "median"}:
            raise ValueError(f"spsa.aggregator must be mean, trimmed or median, got {self.aggregator!r}")
        if self.aggregator != "mean" and self.directions != "shared":
            raise ValueError("spsa.aggregator other than mean needs spsa.directions = 'shared'")
        if not 0 <= self.trim_frac < 0.5:
            raise ValueError(f"spsa.trim_frac must be in [0, 0.5), got {self.trim_frac}")
        if self.round_start not in {"auto", "host", "disk"}:
            raise ValueError(f"spsa.round_start must be auto, host or disk, got {self.round_start!r}")


@dataclass(frozen=True, kw_only=True)
class KavgSection:
    """K local optimizer steps, then averaging (K-AVG, Zhou & Cong 2018); used by kavg, lowrank, dppf and,
    for local training and screening, deft (whose values use ``deft.value_codec``, not ``up_codec``).
    """

    local_steps: int = 4
    """K: local optimizer steps per site per round."""
    lr: float = 1e-4
    """Local learning rate (the base value of ``lr_schedule``)."""
    lr_schedule: str = "constant"
    """How the local learning rate changes across rounds (``edgetune/schedules.py``): ``constant``,
    ``cosine[:floor]``, ``linear[:floor]``, ``inverse[:power]``, ``step:every:factor``. The server
    puts each round's value into the round plan."""
    warmup_rounds: int = 0
    """Linear warm-up of the learning rate over the first rounds (round r <= W: x r / (W + 1))."""
    optimizer: str = "sgd"
    """``sgd`` or ``adamw`` (optimizer state is reset every round: sites keep nothing between rounds)."""
    momentum: float = 0.0
    """SGD momentum (within a round)."""
    weight_decay: float = 0.0
    """Weight decay of the local optimizer."""
    down_codec: str = "fp32"
    """Codec of the global parameters sent to sites: fp32, fp16, bf16, int8-row."""
    up_codec: str = "fp32"
    """Codec of the updates sites send back: fp32, fp16, bf16, int8-row."""
    clip_norm: float = 0.0
    """Clip every site's update to this fixed L2 norm before aggregation (0: use ``clip_mult``)."""
    clip_mult: float = 2.0
    """Adaptive clip (when ``clip_norm`` is 0): every update is clipped to this multiple of the lower
    median of the round's update norms, so no site weighs more than that, even among two (0: off)."""
    outlier_mult: float = 10.0
    """Reject an update whose norm exceeds this multiple of the median norm (3+ sites; 0: off)."""
    aggregator: str = "mean"
    """Across sites, per coordinate: mean (weighted by the examples the server assigned), trimmed, median."""
    trim_frac: float = 0.125
    """Fraction trimmed from each side by the trimmed mean (rounded down: with the default 0.125,
    nothing is trimmed below 8 sites, so ``trimmed`` needs ``run.min_sites`` >= 8 or a larger fraction)."""
    batch_schedule: str = "constant"
    """``data.batch_size`` across rounds, same spellings: grow-linear[:cap] or grow-geometric:f[:cap]
    give K-AVG Theorem 2's growing batch."""
    grad_accum_steps: int = 1
    """Gradient accumulation: each local step's batch (``data.batch_size`` examples) runs as this many
    micro-batches whose gradients add up, weighted by answer tokens: the same step, less activation memory."""

    def __post_init__(self) -> None:
        from edgetune.comm.tensors import TENSOR_CODECS
        from edgetune.schedules import parse

        if self.local_steps < 1 or not self.lr > 0:
            raise ValueError("kavg.local_steps must be >= 1 and kavg.lr > 0")
        if self.optimizer not in {"sgd", "adamw"}:
            raise ValueError(f"kavg.optimizer must be sgd or adamw, got {self.optimizer!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("kavg.momentum must be in [0, 1) and kavg.weight_decay >= 0")
        for key in ("down_codec", "up_codec"):
            if getattr(self, key) not in TENSOR_CODECS:
                raise ValueError(f"kavg.{key} must be one of {', '.join(TENSOR_CODECS)}, got {getattr(self, key)!r}")
        if self.clip_norm < 0 or self.outlier_mult < 0 or self.clip_mult < 0:
            raise ValueError("kavg.clip_norm, kavg.clip_mult and kavg.outlier_mult must be >= 0")
        if 0 < self.clip_mult < 1:
            raise ValueError(
                f"kavg.clip_mult must be 0 (off) or >= 1 (1 clips every site to the median), got {self.clip_mult}"
            )
        if self.aggregator not in {"mean", "trimmed", "median"}:
            raise ValueError(f"kavg.aggregator must be mean, trimmed or median, got {self.aggregator!r}")
        if not 0 <= self.trim_frac < 0.5:
            raise ValueError(f"kavg.trim_frac must be in [0, 0.5), got {self.trim_frac}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"kavg.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        parse(self.lr_schedule, key="kavg.lr_schedule")
        parse(self.batch_schedule, key="kavg.batch_schedule")
        if self.warmup_rounds < 0:
            raise ValueError(f"kavg.warmup_rounds must be >= 0, got {self.warmup_rounds}")


@dataclass(frozen=True, kw_only=True)
class LowrankSection:
    """LoRA factors with K-AVG local steps (``model.trainable = "lora"``); see ``algorithms/lowrank.py``."""

    mode: str = "exact"
    """``fedavg`` (A and B averaged separately: the common, biased baseline), ``exact`` (average of
    B_i A_i per layer, truncated SVD back to rank r), ``ab-groups`` (half the sites train and send
    only A, half only B; AB-training) or ``only-b`` (shared frozen A, exact averaging of B)."""
    svd_cutoff: float = 0.0
    """exact / re-factorisation: drop singular values below this fraction of the largest (0: keep rank r)."""
    refactor_every: int = 4
    """ab-groups: every N-th round all sites train both factors and the server re-factorises exactly (0: never)."""
    rebound_rounds: int = 2
    """ab-groups: after a re-factorisation the learning rate climbs back over this many rounds (0: off)."""
    rebound_lr: float = 1e-5
    """ab-groups: learning rate right after a re-factorisation (AB-training's rebound start)."""
    full_rank_steps: int = 0
    """ab-groups: AB-training's full-rank phase (0: off). Re-factorisation rounds then train a dense
    delta on every LoRA target module's weight for this many local steps (factors frozen), and the
    server truncates s*B*A + the mean delta back to rank r. Sites upload the dense deltas (out x in
    per adapted layer, ``kavg.up_codec``) in those rounds: counted like every other byte."""
    full_rank_lr: float = 0.0
    """Learning rate of the full-rank steps (0: the round's ``kavg`` learning rate)."""

    def __post_init__(self) -> None:
        if self.mode not in {"fedavg", "exact", "ab-groups", "only-b"}:
            raise ValueError(f"lowrank.mode must be fedavg, exact, ab-groups or only-b, got {self.mode!r}")
        if self.full_rank_steps < 0 or self.full_rank_lr < 0:
            raise ValueError("lowrank.full_rank_steps and lowrank.full_rank_lr must be >= 0")
        if self.full_rank_steps and (self.mode != "ab-groups" or self.refactor_every == 0):
            raise ValueError(
                "lowrank.full_rank_steps runs in ab-groups' re-factorisation rounds: "
                "set lowrank.mode = 'ab-groups' and lowrank.refactor_every >= 1"
            )
        if not 0 <= self.svd_cutoff < 1:
            raise ValueError(f"lowrank.svd_cutoff must be in [0, 1), got {self.svd_cutoff}")
        if self.refactor_every < 0 or self.rebound_rounds < 0 or not self.rebound_lr > 0:
            raise ValueError("lowrank.refactor_every and rebound_rounds must be >= 0, rebound_lr > 0")


@dataclass(frozen=True, kw_only=True)
class DeftSection:
    """Sparsified uplink with error feedback (DEFT, Yoon & Oh 2023); see ``algorithms/deft.py``."""

    density: float = 0.01
    """k = density x trainable parameters: the values each round's union aims at."""
    selector: str = "deft"
    """``deft`` (server-assigned partitions, norm-proportional k, two phases) or ``topk`` (plain
    top-k per site: the baseline whose index union grows with the number of sites)."""
    value_codec: str = "fp32"
    """Codec of the uploaded values: fp32, fp16 or bf16."""
    error_feedback: bool = True
    """Carry what was not sent into the next round's update (residuals kept on each site)."""
    allocation: str = "site-norms"
    """Where the per-partition k_p comes from (``selector = "deft"``): ``site-norms`` (the paper: every
    round each site reports the norm of its error-feedback update per partition, 2 bytes each, in a
    first exchange; the server allocates from their mean) or ``applied`` (the norm of last round's
    applied sparse mean; no extra exchange, but the allocation feeds on its own past choices)."""

    def __post_init__(self) -> None:
        if self.allocation not in {"site-norms", "applied"}:
            raise ValueError(f"deft.allocation must be site-norms or applied, got {self.allocation!r}")
        if not 0 < self.density <= 1:
            raise ValueError(f"deft.density must be in (0, 1], got {self.density}")
        if self.selector not in {"deft", "topk"}:
            raise ValueError(f"deft.selector must be deft or topk, got {self.selector!r}")
        if self.value_codec not in {"fp32", "fp16", "bf16"}:
            raise ValueError(f"deft.value_codec must be fp32, fp16 or bf16, got {self.value_codec!r}")


@dataclass(frozen=True, kw_only=True)
class DppfSection:
    """Pull-push around the average after each aggregation (DPPF, Dimlioglu & Choromanska 2025)."""

    alpha: float = 0.5
    """Pull strength: x_i <- x_bar + (1 - alpha) (x_i - x_bar) + lam u_i. alpha = 1, lam = 0 is kavg."""
    lam: float = 1e-3
    """Push strength (the spread settles near lam / alpha)."""
    schedule: str = "constant"
    """``constant``, or ``linear``: the strengths ``ramp`` names grow from 0 over ``warmup_rounds``."""
    warmup_rounds: int = 0
    """Rounds of the linear ramp."""
    ramp: str = "push"
    """What the linear schedule ramps: ``push`` (lam only; the pull alpha is constant from round 1)
    or ``pull-push`` (alpha and lam together, keeping lam / alpha; early rounds couple sites weakly)."""
    distance: str = "params"
    """Where the worker spread MV is measured: ``params`` (trainable parameters) or ``delta-w``
    (LoRA products s*B*A per layer, invariant to rescaling B and A)."""

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1 or self.lam < 0 or not math.isfinite(self.lam):
            raise ValueError("dppf.alpha must be in [0, 1] and dppf.lam a finite number >= 0")
        if self.schedule not in {"constant", "linear"} or self.warmup_rounds < 0:
            raise ValueError("dppf.schedule must be constant or linear, dppf.warmup_rounds >= 0")
        if self.ramp not in {"push", "pull-push"}:
            raise ValueError(f"dppf.ramp must be push or pull-push, got {self.ramp!r}")
        if self.distance not in {"params", "delta-w"}:
            raise ValueError(f"dppf.distance must be params or delta-w, got {self.distance!r}")


@dataclass(frozen=True, kw_only=True)
class ImvSection:
    """Checkpoint flatness: the forward-only valley probe (``metrics/imv.py``), for any algorithm."""

    every_rounds: int = 0
    """Measure the aggregated model's IMV every N rounds (0: off)."""
    num_directions: int = 4
    """R random unit directions (from the ``imv`` stream, never a training stream)."""
    delta: float = 0.1
    """Loss rise that defines the valley's edge."""
    num_examples: int = 16
    """Held-out examples used for the probe's loss."""
    max_radius: float = 0.0
    """Largest radius searched; a direction still flat there reports this value. 0: 1.0 with
    ``filter`` normalisation (every row moved by its own norm), 64.0 with ``global``."""
    bisect_steps: int = 8
    """Bisection steps per direction after bracketing."""
    normalize: str = "filter"
    """Direction scale: ``filter`` (Li et al. 2018's filter normalisation, per row of every matrix:
    each row of d has the norm of that row of the weights, 1-D tensors are not moved; radii are
    relative, so weight rescalings do not move them) or ``global`` (one unit vector over all probed
    parameters; radii in parameter-space L2 units, edgetune's earlier probe)."""

    def __post_init__(self) -> None:
        if self.every_rounds < 0 or self.num_directions < 1 or self.num_examples < 1 or self.bisect_steps < 1:
            raise ValueError("imv.every_rounds >= 0, imv.num_directions, num_examples and bisect_steps >= 1")
        if not (self.delta > 0 and math.isfinite(self.delta)) or not self.max_radius >= 0:
            raise ValueError("imv.delta must be positive and imv.max_radius >= 0 (0: the normalisation's default)")
        if self.normalize not in {"filter", "global"}:
            raise ValueError(f"imv.normalize must be filter or global, got {self.normalize!r}")

    @property
    def radius_limit(self) -> float:
        """``max_radius``, or its default for ``normalize`` when it is 0."""
        if self.max_radius:
            return self.max_radius
        return 1.0 if self.normalize == "filter" else 64.0


ALGORITHM_NAMES = ("spsa", "kavg", "lowrank", "deft", "dppf")

INT_LIMITS: dict[str, tuple[int, int]] = {
    "num_rounds": (1, 1_000_000),
    "run.seed": (-(2**63), 2**63 - 1),  # the data stream key packs it as a signed 64-bit integer
    "run.num_sites": (0, 100_000),
    "run.min_sites": (1, 100_000),
    "run.keep_checkpoints": (1, 1_000),
    "model.lora_rank": (1, 4_096),
    "data.demo_facts": (1, 100_000),
    "data.max_length": (8, 131_072),
    "data.batch_size": (1, 4_096),
    "eval.num_examples": (1, 1_000_000),
    "eval.batch_size": (1, 4_096),
    "eval.max_new_tokens": (1, 4_096),
    "spsa.num_steps": (1, 10_000),
    "spsa.num_probes": (1, 10_000),
    "spsa.seed_pool": (0, 1_000_000),
    "kavg.local_steps": (1, 100_000),
    "imv.num_directions": (1, 1_024),
    "imv.num_examples": (1, 100_000),
    "imv.bisect_steps": (1, 64),
}
"""Bounds of integer keys that size memory, compute or the wire (a batch of 1e12 examples or 1e9 local
steps is a typo, not a plan). Any other integer key must lie in ``DEFAULT_INT_RANGE``."""
DEFAULT_INT_RANGE = (-(2**31), 2**31 - 1)


def _check_int_bounds(flat: dict[str, Any], *, upper_only: bool = False) -> None:
    """Every integer of a flat config within its ``INT_LIMITS`` range (``ValueError`` naming the key).

    ``from_run_config`` checks the upper bounds before any section is built, so an absurd size is named
    as such rather than by a section's own check (spsa's K x P <= 65536 is ``SpsaSection``'s); values
    below a section's minimum get that section's message.
    """
    for key, value in flat.items():
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        lo, hi = INT_LIMITS.get(key, DEFAULT_INT_RANGE)
        if value > hi or (value < lo and not upper_only):
            raise ValueError(f"{key} = {value} is outside [{lo:,}, {hi:,}]")


def _check_bounds(cfg: RunConfig) -> None:
    _check_int_bounds(flatten(cfg))


def _check_trim(cfg: RunConfig) -> None:
    """A trimmed mean that trims nothing for the smallest quorum is a mean: refuse it."""
    section = "spsa" if cfg.algorithm == "spsa" else "kavg"
    sec = getattr(cfg, section)
    if sec.aggregator != "trimmed":
        return
    if math.floor(sec.trim_frac * cfg.run.min_sites) < 1:
        need = math.ceil(1 / sec.trim_frac) if sec.trim_frac > 0 else None
        raise ValueError(
            f"{section}.aggregator = 'trimmed' with {section}.trim_frac = {sec.trim_frac} trims nothing when a round "
            f"commits with run.min_sites = {cfg.run.min_sites} sites (floor({sec.trim_frac} x {cfg.run.min_sites}) "
            f"= 0): raise run.min_sites to {need or 'a count that trims'} or more, or {section}.trim_frac to "
            f"{1 / cfg.run.min_sites:.4g} or more"
        )


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole configuration of one federated run."""

    algorithm: str = "spsa"
    """Which algorithm section is active."""
    num_rounds: int = 3
    """Rounds of federation."""
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    eval: EvalSection = field(default_factory=EvalSection)
    crypto: CryptoSection = field(default_factory=CryptoSection)
    spsa: SpsaSection = field(default_factory=SpsaSection)
    kavg: KavgSection = field(default_factory=KavgSection)
    lowrank: LowrankSection = field(default_factory=LowrankSection)
    deft: DeftSection = field(default_factory=DeftSection)
    dppf: DppfSection = field(default_factory=DppfSection)
    imv: ImvSection = field(default_factory=ImvSection)

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHM_NAMES:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHM_NAMES)}, got {self.algorithm!r}")
        if self.num_rounds < 1:
            raise ValueError(f"num_rounds must be >= 1, got {self.num_rounds}")
        if len(device_list(self.model.device)) > 1 and self.algorithm != "spsa":
            raise ValueError(
                f"model.device = {self.model.device!r} names several devices, which only spsa uses (it spreads "
                f"its probes); {self.algorithm} trains on one device: set model.device to one of them"
            )
        if self.algorithm == "lowrank" and self.model.trainable.strip() != "lora":
            raise ValueError("algorithm = 'lowrank' trains LoRA factors: set model.trainable = 'lora'")
        _check_bounds(self)
        _check_trim(self)
        lr_sched = schedules.parse(self.spsa.lr_schedule, key="spsa.lr_schedule")
        for r in range(1, self.num_rounds + 1):
            if not lr_sched.value(self.spsa.lr, r, self.num_rounds) > 1e-12 * self.spsa.lr:
                raise ValueError(
                    f"spsa.lr_schedule {self.spsa.lr_schedule!r} gives lr 0 in round {r} of {self.num_rounds}: "
                    "give it a floor (e.g. 'cosine:0.05')"
                )
        if self.algorithm != "spsa":
            lr = schedules.parse(self.kavg.lr_schedule, key="kavg.lr_schedule")
            for r in range(1, self.num_rounds + 1):
                if not lr.value(self.kavg.lr, r, self.num_rounds, self.kavg.warmup_rounds) > 0:
                    raise ValueError(
                        f"kavg.lr_schedule = {self.kavg.lr_schedule!r} gives lr 0 in round {r} of {self.num_rounds}: "
                        "give it a floor above 0 (cosine:0.1, linear:0.1)"
                    )
        if self.algorithm == "spsa" and self.model.dtype != "float32":
            # spsa perturbs the weights the forward pass reads by +-eps*z with eps a power of two, exact
            # only in fp32: in bf16 (8 significant bits) w +- 2^-10 rounds back to w for |w| >= 2^-2, so
            # the probe measures rounding, not the loss slope. Masters are fp32 anyway.
            raise ValueError(
                f"algorithm = 'spsa' needs model.dtype = 'float32' (got {self.model.dtype!r}): in bf16/fp16 the "
                "+-eps perturbations round away; use a backprop algorithm (kavg, lowrank) for bf16 weights"
            )
        if self.algorithm == "spsa" and self.model.quantize != "none":
            raise ValueError("algorithm = 'spsa' perturbs the weights themselves: model.quantize must be 'none'")
        if self.algorithm == "spsa" and (self.model.gradient_checkpointing or self.model.autocast != "none"):
            raise ValueError(
                "model.gradient_checkpointing and model.autocast apply to backprop training; spsa runs forward only"
            )


def _sections() -> dict[str, type]:
    return {
        f.name: f.default_factory  # type: ignore[misc]
        for f in dataclasses.fields(RunConfig)
        if f.default_factory is not dataclasses.MISSING
    }


def flatten(cfg: RunConfig) -> dict[str, Scalar]:
    """Return ``{"section.key": value}`` for every field, top-level keys without a section."""
    out: dict[str, Scalar] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                out[f"{f.name}.{g.name}"] = getattr(value, g.name)
        else:
            out[f.name] = value
    return out


def _coerce(key: str, value: Any, default: Scalar) -> Scalar:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false"}:
            return value.lower() == "true"
        raise ValueError(f"config key {key!r}: expected true/false, got {value!r}")
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        try:
            as_float = float(value)
        except ValueError as err:
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}") from err
        if not as_float.is_integer():
            raise ValueError(f"config key {key!r}: expected an integer, got {value!r}")
        return int(as_float)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config key {key!r}: expected a number, got {value!r}") from err
        if not math.isfinite(out):
            raise ValueError(f"config key {key!r}: expected a finite number, got {value!r}")
        return out
    if not isinstance(value, str):
        raise ValueError(f"config key {key!r}: expected a string, got {value!r}")
    return value


def from_run_config(flat: dict[str, Any]) -> RunConfig:
    """Build a ``RunConfig`` from dotted keys (Flower's ``context.run_config``, a recipe).

    Unknown keys and values of the wrong type raise ``ValueError`` naming the key.
    """
    defaults = flatten(RunConfig())
    unknown = sorted(set(flat) - set(defaults))
    if unknown:
        raise ValueError(f"unknown config key(s): {', '.join(unknown)}")
    values = {k: _coerce(k, v, defaults[k]) for k, v in flat.items()}
    _check_int_bounds(values, upper_only=True)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    sections = _sections()
    for section, kwargs in nested.items():
        top[section] = sections[section](**kwargs)
    return RunConfig(**top)


def flatten_toml(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Turn nested TOML tables into dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_toml(value, f"{name}."))
        else:
            out[name] = value
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override with TOML value syntax (bare words become strings)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe TOML file into dotted keys, apply ``key=value`` overrides, validate."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {p} does not exist")
    try:
        flat = flatten_toml(tomllib.loads(p.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"recipe {p} is not valid TOML: {err}") from err
    for item in overrides or []:
        key, value = parse_override(item)
        flat[key] = value
    from_run_config(flat)  # validate now, with the recipe's name in the traceback
    return flat


def to_toml(flat: dict[str, Scalar]) -> str:
    """Write dotted keys as TOML tables (the inverse of ``flatten_toml`` for one level)."""
    top = {k: v for k, v in flat.items() if "." not in k}
    sections: dict[str, dict[str, Scalar]] = {}
    for key, value in flat.items():
        if "." in key:
            section, name = key.split(".", 1)
            sections.setdefault(section, {})[name] = value
    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    for section, items in sections.items():
        lines.append("")
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in items.items())
    return "\n".join(lines) + "\n"


def _toml_value(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, int):
        return str(v)
    out = []
    for ch in v:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def pyproject_table(cfg: RunConfig | None = None) -> str:
    """The ``[tool.flwr.app.config]`` block of pyproject.toml: every key, with ``cfg``'s values
    (default: the defaults).
    """
    lines = ["[tool.flwr.app.config]"]
    for line in to_toml(flatten(cfg if cfg is not None else RunConfig())).splitlines():
        lines.append(f"[tool.flwr.app.config.{line[1:]}" if line.startswith("[") else line)
    return "\n".join(lines).rstrip() + "\n"


def write_pyproject(path: Path) -> bool:
    """Rewrite the config block of ``path`` in place; return True if it changed."""
    text = path.read_text()
    start = text.index("[tool.flwr.app.config]")
    # the block ends at the first table that is not a tool.flwr.app.config sub-table
    pos = start
    while True:
        nxt = text.find("\n[", pos + 1)
        if nxt == -1:
            end = len(text)
            break
        if not text.startswith("[tool.flwr.app.config", nxt + 1):
            end = nxt + 1
            break
        pos = nxt
    new = text[:start] + pyproject_table() + "\n" + text[end:].lstrip("\n")
    if new != text:
        path.write_text(new)
        return True
    return False


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-pyproject"]:
        changed = write_pyproject(Path(__file__).resolve().parent.parent / "pyproject.toml")
        print("pyproject.toml updated" if changed else "pyproject.toml already up to date")
    else:
        sys.stdout.write(pyproject_table())

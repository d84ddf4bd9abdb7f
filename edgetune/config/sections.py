"""The run-wide sections of ``RunConfig``: run, model, data, eval, crypto and imv.

Each is a frozen, keyword-only dataclass whose attribute docstrings document its keys; each checks its
own values in ``__post_init__`` (``ValueError`` naming the key). The algorithm sections are in
``algorithms.py``; checks across sections are ``RunConfig``'s (``run.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune.config.values import check_gpus_per_site, device_list, split_csv


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
    in_flight: int = 0
    """Messages the server keeps in flight per exchange: 0 sends every asked site its message at
    once (deployments: real sites work in parallel); N sends N and one more as each reply comes in.
    ``edgetune simulate`` with Flower's engine sets it (when the recipe does not) to 4 x the sites
    that run at once, because Flower's in-memory link state scans every stored message for every
    node several times a second, which makes a round of N sites cost O(N^2) (docs/many-machines.md)."""
    gpus_per_site: float = 0.0
    """Simulation: GPUs Flower's backend reserves per simulated site (fractional ``num-gpus``
    client resources: 0.25 puts four sites on each GPU). 0: simulated sites run on the CPU
    unless ``model.device`` names a GPU explicitly."""
    portable_sites: bool = False
    """Simulation: each simulated site gets its key kit from the server in the hello exchange and
    carries its state between rounds in Flower's Context, instead of reading both from the disk its
    actor runs on, so sites may run on any machine of a Ray cluster (``flower/portable.py``).
    ``edgetune simulate`` turns it on when ``RAY_ADDRESS`` names a cluster. Only kits the server
    generated for the run are handed out (refused with ``crypto.keys_dir``)."""
    track: str = ""
    """Also export the per-round metrics to experiment trackers: ``tensorboard`` (event files in
    ``<run>/tensorboard``; needs the tensorboard package), ``wandb`` (needs wandb; offline unless
    ``WANDB_MODE`` says otherwise), or both, comma-separated; empty: off."""

    def __post_init__(self) -> None:
        if self.num_sites < 0:
            raise ValueError(f"run.num_sites must be >= 0, got {self.num_sites}")
        if self.min_sites < 1:
            raise ValueError(f"run.min_sites must be >= 1, got {self.min_sites}")
        if self.num_sites and self.min_sites > self.num_sites:
            raise ValueError(
                f"run.min_sites = {self.min_sites} is more than run.num_sites = {self.num_sites}: no round could "
                f"reach its quorum; set run.min_sites to {self.num_sites} or fewer"
            )
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
        if self.in_flight < 0:
            raise ValueError(f"run.in_flight must be >= 0 (0: every message at once), got {self.in_flight}")
        check_gpus_per_site(self.gpus_per_site, "run.gpus_per_site")
        unknown = sorted(set(split_csv(self.track)) - {"tensorboard", "wandb"})
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
    (same bytes and state hash as one device); the other algorithms split each step's batch into
    at least one micro-batch per device and add the gradients in micro-batch order (bitwise the
    step of one device with as many micro-batches, ``kavg.grad_accum_steps``)."""
    trainable: str = "q_proj,k_proj,v_proj,o_proj"
    """``all``, ``lora`` (LoRA adapters on ``target_modules``; A and B train), ``lora-b`` (LoRA
    adapters, only B trains: A keeps its keyed initialisation, which every replica derives from
    ``run.seed``, so A is never sent), ``label-head`` (a delta on the output rows of the first tokens
    of ``head_labels``, everything else frozen: ``models/labelhead.py``), ``token-bias`` (one bias per
    vocabulary token on the logits, everything else frozen: ``models/tokenbias.py``; with spsa, probes
    score cached tokens, ``spsa.bias_pool``), or comma-separated substrings of parameter names."""
    head_labels: str = ""
    """With ``trainable = "label-head"``: the task's labels (candidate answers), comma-separated; the
    head rows of their first answer tokens train. Empty with ``data.source = "triage"``: its ten
    categories. Every training example's candidates must be among them."""
    head_prefix: str = ""
    """The text the answer follows in the prompt (``answer_prefix`` of the rows, ``Category:`` for
    triage; filled in with the labels), which decides how a label's first token is tokenised."""
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
        if self.quantize != "none" and len(device_list(self.device)) > 1:
            raise ValueError(
                f"model.quantize = {self.quantize!r} with several devices ({self.device}): a site's copies on further "
                "devices are not built for quantised base weights; use one device, or quantize = 'none'"
            )
        _ = self.lora_layer_list  # validates the spelling
        if self.trainable.strip() == "label-head" and self.head_labels and len(self.head_label_list) < 2:
            raise ValueError(f"model.head_labels needs at least two labels, got {self.head_labels!r}")

    @property
    def target_module_list(self) -> tuple[str, ...]:
        return split_csv(self.target_modules)

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
    def head_label_list(self) -> tuple[str, ...]:
        return split_csv(self.head_labels)

    @property
    def trainable_patterns(self) -> tuple[str, ...]:
        return split_csv(self.trainable)


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
        for pair in split_csv(self.columns):
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

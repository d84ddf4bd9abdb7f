"""One config section per algorithm: spsa, kavg, lowrank, deft and dppf.

``algorithm = "<name>"`` picks the active one; every section is always present (Flower declares every
key), so a recipe can switch algorithms by one key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from edgetune import schedules
from edgetune.comm.codecs import is_codec
from edgetune.config.values import is_power_of_two

ALGORITHM_NAMES = ("spsa", "kavg", "lowrank", "deft", "dppf")


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
    objective: str = "answer"
    """What a probe's loss scores. ``answer``: next-token cross-entropy over the answer tokens (any
    data). ``choices``: MeZO's classification objective for data whose examples list candidate
    answers (``choices``, e.g. ``data.source = "triage"``): the cross-entropy of the right candidate
    among the candidates' first tokens, the scores label accuracy ranks. Zeroth-order estimates
    carry one number per probe; this one measures exactly what accuracy counts."""
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
    or ``log8`` (sign + 7-bit log magnitude); or one bit per scalar: ``sign`` (``sign:B``), its sign
    and one magnitude byte per B local steps (default 16) that the block's scalars share."""
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

    bias_pool: int = 4096
    """With ``model.trainable = "token-bias"``: the answer tokens per site whose frozen logits' exponentials
    are cached (``models/biascache.py``; each training example contributes an equal share, a keyed draw).
    A probe then costs a product with the batch's pooled tokens instead of a forward pass; memory is
    pool x vocabulary float32 values (4,096 tokens of SmolLM2: 805 MB)."""
    bias_examples: int = 0
    """With ``model.trainable = "token-bias"``: the pool draws from at most this many of a site's training
    examples (a keyed draw; 0: all). Only they pass through the model (once per run) and a site's step
    batches come from them, so this bounds the feature pass's time."""

    def __post_init__(self) -> None:
        if not is_power_of_two(self.eps):
            raise ValueError(f"spsa.eps must be a power of two (e.g. 0.0009765625 = 2^-10), got {self.eps}")
        if self.lr <= 0 or self.num_steps < 1 or self.num_probes < 1:
            raise ValueError("spsa.lr must be > 0, spsa.num_steps and spsa.num_probes >= 1")
        schedules.parse(self.lr_schedule, key="spsa.lr_schedule")
        if self.num_steps * self.num_probes > 1 << 16:
            raise ValueError("spsa.num_steps x spsa.num_probes must be at most 65536 (one byte each)")
        if not 1 <= self.bias_pool <= 1 << 20:
            raise ValueError(f"spsa.bias_pool must be between 1 and 1048576 tokens, got {self.bias_pool}")
        if self.bias_examples < 0:
            raise ValueError(f"spsa.bias_examples must be >= 0 (0: all examples), got {self.bias_examples}")
        if self.difference not in {"central", "forward"}:
            raise ValueError(f"spsa.difference must be central or forward, got {self.difference!r}")
        if self.objective not in {"answer", "choices"}:
            raise ValueError(f"spsa.objective must be answer or choices, got {self.objective!r}")
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
        if not is_codec(self.scalar_codec):
            raise ValueError(
                f"spsa.scalar_codec must be int8-sr, log8, sign or sign:B (B = 1..65536 local steps per "
                f"magnitude byte), got {self.scalar_codec!r}"
            )
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

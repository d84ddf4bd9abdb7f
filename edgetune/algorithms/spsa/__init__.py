"""spsa: shared-seed zeroth-order fine-tuning, one byte per probe on the wire.

Sources: Zelikman et al. 2023, "Just One Byte (per gradient)" (shared randomness, scalars only);
Malladi et al. 2023, MeZO (SPSA in inference memory); Qin et al. 2024, FedKSeed (seed pool);
Liu et al. 2024, Sparse MeZO (perturb a subset).

One round r, site i, K steps x P probes::

    z_{k,p} = Rademacher(key(S_r, i, k, p))                    # crypto/keystream.py, portable
    g = [L(w + eps z; B_k) - L(w - eps z; B_k)] / (2 eps)      # central: two forwards per probe
      or [L(w + eps z; B_k) - L(w; B_k)] / eps                 # forward: P + 1 forwards per step
    code = one byte (stochastic rounding inside [-scale, scale]) # comm/codecs.py
      or one sign bit, a magnitude byte per B steps (``sign``)   # ~1.06 bits at B = 16, P = 8
    reply: K*P bytes (sign: ceil(K/B) + ceil(K*P/8))            # + 88 bytes framing (< 40 bytes)

    server and every site:  theta_{r+1} = theta_r - sum_{i,k,p} c_{i,k,p} z_{i,k,p}
                            c = fp32(lr * g_hat / D), D = N*P (mean) or sqrt(N*P) (sqrt),
                            applied in canonical order (site id, step, probe); a site's
                            g_hat vector is first bounded in norm (log.site_norm_factors)

Every copy of theta replays the same list of (key, c) from the same round-start state, so the
server and all sites hold bitwise identical weights after every round; the state hash travels
in the (signed) round plan and comes back in every reply. The round secret S_r reaches a site
only inside its seed envelope (``crypto/envelope.py``).

Where to perturb (all compatible with replay): any trainable subset (``model.trainable``),
LoRA-B only with a keyed, never-sent A (``model.trainable = "lora-b"``), and a sparse mask of
the smallest base weights (``spsa.sparse_frac``). Directions: fresh per round, a per-round pool
of S seeds (``spsa.pool_scope = "round"``), or one fixed pool of S seeds for the whole run
(``"run"``, ``pool.py``): then theta = theta_0 - q * sum_s n_s z_s exactly in integers, a site
catches up from S coefficients, a model ships as a delta file, and a server-side optimizer
(momentum, Adam) runs on the S coefficients with no extra bytes.

Files: ``log.py`` (the replay log and its coefficients), ``pool.py`` (run-scope pool, optimizer),
``replica.py`` (a process's copy of theta), ``local.py`` (a site's probes), ``server.py``,
``client.py``, ``delta.py`` (model delivery by coefficients).
"""

from edgetune.algorithms.spsa.client import SpsaClient
from edgetune.algorithms.spsa.local import batch_loss, local_steps
from edgetune.algorithms.spsa.log import (
    MAX_LOG_ROUNDS,
    LogEntry,
    decode_log,
    encode_log,
    pool_gradient,
    probe_key,
    replay_terms,
    robust,
)
from edgetune.algorithms.spsa.replica import HASH_BYTES, Replica, SpaceSpec, clear_replicas, replica_for
from edgetune.algorithms.spsa.server import SpsaServer, reply_overhead_bytes, round_secret

__all__ = [
    "HASH_BYTES",
    "MAX_LOG_ROUNDS",
    "LogEntry",
    "Replica",
    "SpaceSpec",
    "SpsaClient",
    "SpsaServer",
    "batch_loss",
    "clear_replicas",
    "decode_log",
    "encode_log",
    "local_steps",
    "pool_gradient",
    "probe_key",
    "replay_terms",
    "replica_for",
    "reply_overhead_bytes",
    "robust",
    "round_secret",
]

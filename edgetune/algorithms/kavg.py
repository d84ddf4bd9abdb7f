"""kavg: K local optimizer steps per site, then averaging of the trainable parameters.

Source: Zhou & Cong 2018, "On the convergence properties of a K-step averaging stochastic
gradient descent algorithm for nonconvex optimization" (K-AVG; FedAvg with K local steps)::

    site i:  y <- theta_r ; repeat K times: y <- y - lr * grad L_i(y; B_{i,k})
             reply  Delta_i = y - theta_r                  (codec ``kavg.up_codec``)
    server:  theta_{r+1} = theta_r + sum_i w_i Delta_i / sum_i w_i

The weights w_i are the examples the server assigned to site i (K x batch size), never a
number read from a reply. ``kavg.lr_schedule``, ``kavg.batch_schedule`` and ``kavg.warmup_rounds``
make lr and the batch size functions of the round (``edgetune/schedules.py``; K-AVG's Theorem 2:
a diminishing lr_r with a growing B_r); the server evaluates them when it plans round r and sends
the values in the plan (``round_lr``, ``round_batch_size``). With K = 1 and plain SGD this is one
synchronous SGD step on the union of the sites' batches (the objective being the mean of the site
losses).

Updates are screened before they count: exact size for the codec, finite values, rejection of
updates far larger than the median site's (a scaled or corrupted update; 3+ sites), and a norm
clip in every federation size (adaptive by default, ``screening.py``); the aggregate itself must be
finite and no larger than the clipped updates allow. Coordinate-wise trimmed mean and median are
available for Byzantine sites.

What is kavg's own is below: how the updates combine and what a site does in a round. Sending
the tensors, the plan, decoding and screening the replies, the check of the step and resuming are
shared with lowrank, dppf and deft (``weights.py``); the local steps are ``training.py``.
"""

from __future__ import annotations

import torch

from edgetune.algorithms.weights import WeightsClient, WeightsServer, aggregate_tensors, example_weights
from edgetune.comm.wire import Payload


class KavgServer(WeightsServer):
    """K-AVG server: theta += the weighted (or robust) average of the screened site updates."""

    def combine(
        self, round_idx: int, updates: dict[str, list[torch.Tensor]], plans: dict[str, dict]
    ) -> dict[str, float]:
        sites = sorted(updates)
        k = self.kcfg
        mean = aggregate_tensors([updates[s] for s in sites], example_weights(plans, sites), k.aggregator, k.trim_frac)
        for p, d in zip(self.params, mean):
            p.add_(d)
        return {}


class KavgClient(WeightsClient):
    """K-AVG site: from the global parameters, K local steps; reply with the deltas and the mean loss."""

    def step(self, phase: str, msg: Payload, state: Payload) -> tuple[Payload, Payload]:
        if phase != "train":
            raise ValueError(f"kavg has no phase {phase!r}")
        plan, start = self.load_global(msg)  # checks the plan, sets the model to the global tensors
        return self.train_and_reply(plan, start), state

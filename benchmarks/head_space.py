"""How far a label-head space could take the triage demo: the measurement that chose the demo's space (issue 11).

Usage (from the repository root)::

    python -m benchmarks.head_space [--recipe recipes/spsa/smollm2-135m-4c.toml] [--fo-steps 300]
        [--zo-rounds 20] [--zo-local-steps 200] [--zo-probes 8] [--zo-codecs exact,int8-sr,sign] [--seeds 0,1,2]
        [--out benchmarks/results/head_space.json] [--plot benchmarks/results/head_space.png]

The space: an additive delta D on the output-head rows of the candidate answers' first tokens (10 label
tokens x hidden size; 5,760 values on SmolLM2), below it the frozen model. Because nothing below the head
moves, each example's final hidden state at the answer position is computed once (``features``) and every
later loss is a small matmul on it. On those cached features this script measures

* the first-order ceiling (``first_order``): Adam, full batch over the pooled sites' training reports,
  held-out accuracy (the demo's metric: the right category among the report's candidates) every few steps;
* a zeroth-order federated simulation (``zeroth_order``): every site takes ``--zo-local-steps`` local steps
  of ``--zo-probes`` forward-difference Rademacher probes on its own reports (FedKSeed's local steps, each
  probe one scalar on the wire), the server applies the mean of the sites' accumulated steps; one curve per
  seed (the directions and nothing else differ).

It is a simulation on cached features, not an edgetune run: no Flower, no bytes counted; it reports scalars
per site per round. ``--zo-codecs`` quantises them with spsa's codecs (``exact``: not at all), with the
directions the same for every codec; this is how the one-bit ``sign`` codec was checked before a real run.
Its first purpose was to say whether the space is worth building into spsa before building it; it is built
now (``model.trainable = "label-head"``, ``models/labelhead.py`` and ``models/headcache.py``;
``recipes/spsa/smollm2-135m-4c-head.toml`` is the demo).
Every random draw comes from a generator seeded here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import code_version
from edgetune.algorithms import scalar_clip
from edgetune.comm.codecs import codec_for
from edgetune.config import from_run_config, load_recipe
from edgetune.data.prompts import TokenizedSet
from edgetune.data.sources import heldout_examples, site_examples
from edgetune.models.headcache import compute_features
from edgetune.models.labelhead import add_label_head, label_head_of
from edgetune.models.load import load_model
from edgetune.models.loss import _plain

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPE = ROOT / "recipes" / "spsa" / "smollm2-135m-4c.toml"
RESULTS = ROOT / "benchmarks" / "results"

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(H, S0, L, Y): final hidden states (n, d), base candidate scores (n, C, -inf on padding), each
candidate's row in D (n, C) and the right candidate (n,)."""


def features(recipe: Path) -> tuple[list[Split], Split, int]:
    """Each site's training split and the held-out split on the frozen model, and the number of label rows.

    The label rows are the candidates' first tokens over all splits, in token-id order; the features are
    those a label-head site caches (``models.headcache.compute_features``).
    """
    cfg = from_run_config(load_recipe(recipe))
    model, tok = load_model(cfg.model, seed=cfg.run.seed)
    base = _plain(model)
    if base is None:
        raise SystemExit(f"{recipe}: the model's head is not a plain linear layer; this measurement needs one")
    n_sites = cfg.run.num_sites
    sets = [
        TokenizedSet(tok, examples, cfg.data.max_length)
        for examples in [*(site_examples(cfg, s, n_sites) for s in range(n_sites)), heldout_examples(cfg, n_sites)]
    ]
    tokens = sorted({t for data in sets for i in range(len(data)) for t in data.choice_row(i)[0]})
    head = label_head_of(add_label_head(base, tokens))
    assert head is not None
    splits: list[Split] = []
    for data in sets:
        f = compute_features(base, head, data)
        splits.append((f.hidden, f.base, f.rows, f.target))
    return splits[:-1], splits[-1], len(tokens)


def scores(delta: torch.Tensor, split: Split) -> torch.Tensor:
    """Candidate scores with the head rows moved by ``delta`` (label rows x hidden)."""
    h, s0, rows, _ = split
    return s0 + (h @ delta.T).gather(1, rows)


def evaluate(delta: torch.Tensor, split: Split) -> tuple[float, float]:
    """(accuracy, choice loss) of ``split`` under ``delta``."""
    with torch.no_grad():
        sc = scores(delta, split)
        return float((sc.argmax(1) == split[3]).float().mean()), float(F.cross_entropy(sc, split[3]))


def first_order(sites: list[Split], held: Split, n_rows: int, *, lr: float, steps: int, every: int) -> list[dict]:
    """Adam, full batch over the pooled training splits; the held-out score every ``every`` steps."""
    pooled: Split = tuple(torch.cat([s[i] for s in sites]) for i in range(4))  # type: ignore[assignment]
    delta = torch.zeros(n_rows, pooled[0].shape[1], requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    curve = [{"step": 0, **dict(zip(("accuracy", "choice_loss"), evaluate(delta.detach(), held)))}]
    for step in range(1, steps + 1):
        loss = F.cross_entropy(scores(delta, pooled), pooled[3])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append({"step": step, **dict(zip(("accuracy", "choice_loss"), evaluate(delta.detach(), held)))})
    return curve


def zeroth_order(
    sites: list[Split],
    held: Split,
    n_rows: int,
    *,
    rounds: int,
    local_steps: int,
    probes: int,
    lr: float,
    eps: float,
    seed: int,
    codec: str = "exact",
) -> list[dict]:
    """Federated forward-difference SPSA on the cached features (see the module docstring); the held-out
    score after every round. Site s in round r draws its directions from generator ``(seed, r, s)``, so runs
    that differ only in ``codec`` probe the same directions from the same start.

    ``codec``: ``exact`` (float scalars) or a spsa codec spec (``int8-sr``, ``log8``, ``sign``, ``sign:B``):
    each site then quantises its scalars step by step with ``comm.codecs.codec_for(codec)`` under the round's
    clip (spsa's initial 8.0, then ``algorithms.scalar_clip.next_clip`` from the decoded scalars, as the
    server sets it) and moves along the decoded values, as an edgetune site does; the stochastic-rounding
    uniforms come from their own generator."""
    coder = None if codec == "exact" else codec_for(codec)
    clip_cfg = SimpleNamespace(scale_quantile=0.9, scale_mult=2.0)
    clip = 8.0
    delta = torch.zeros(n_rows, sites[0][0].shape[1])
    curve = [{"round": 0, **dict(zip(("accuracy", "choice_loss"), evaluate(delta, held)))}]
    for rnd in range(1, rounds + 1):
        total = torch.zeros_like(delta)
        decoded: dict[str, np.ndarray] = {}
        for s, split in enumerate(sites):
            gen = torch.Generator().manual_seed(((seed * 100_003 + rnd) * 1_009) + s)
            uniforms = np.random.default_rng([seed, rnd, s, 7])
            encoder = None if coder is None else coder.encoder(clip, probes)
            local = delta.clone()
            sent = []
            with torch.no_grad():
                for _ in range(local_steps):
                    base = F.cross_entropy(scores(local, split), split[3])
                    z = torch.randint(0, 2, (probes, *delta.shape), generator=gen).float() * 2 - 1
                    g = torch.stack(
                        [(F.cross_entropy(scores(local + eps * zp, split), split[3]) - base) / eps for zp in z]
                    )
                    if encoder is not None:
                        g_hat = encoder.step(g.double().numpy(), uniforms.random(probes))
                        sent.append(g_hat)
                        g = torch.from_numpy(g_hat).float()
                    step = (g[:, None, None] * z).mean(0)
                    local -= lr * step
                    total += step
            if sent:
                decoded[f"site-{s}"] = np.concatenate(sent)
        if decoded:
            clip = scalar_clip.next_clip(decoded, clip, clip_cfg).scale
        delta -= lr * total / len(sites)
        curve.append({"round": rnd, **dict(zip(("accuracy", "choice_loss"), evaluate(delta, held)))})
    return curve


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["kind"] == "first_order":
            ax1.plot([p["step"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], label=f"lr {r['lr']:g}")
        elif r["kind"] == "zeroth_order":
            label = f"{r.get('codec', 'exact')}, seed {r['seed']}"
            ax2.plot([p["round"] for p in r["curve"]], [p["accuracy"] for p in r["curve"]], label=label)
    ax1.set(xlabel="Adam steps (full batch, pooled)", ylabel="held-out accuracy", title="first-order ceiling")
    ax2.set(xlabel="rounds", ylabel="held-out accuracy", title="zeroth-order, local steps on cached features")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _relative(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it (results stay readable on another clone)."""
    full = path.resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.head_space", description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--fo-steps", type=int, default=300)
    parser.add_argument("--fo-lrs", default="0.001,0.01")
    parser.add_argument("--zo-rounds", type=int, default=20)
    parser.add_argument("--zo-local-steps", type=int, default=200)
    parser.add_argument("--zo-probes", type=int, default=8)
    parser.add_argument("--zo-lr", type=float, default=1.5e-3)
    parser.add_argument("--zo-eps", type=float, default=1e-3)
    parser.add_argument("--zo-codecs", default="exact", help="exact, or spsa codec specs: int8-sr,log8,sign,sign:B")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", type=Path, default=RESULTS / "head_space.json")
    parser.add_argument("--plot", type=Path, default=RESULTS / "head_space.png")
    args = parser.parse_args(argv)
    t0 = time.time()
    sites, held, n_rows = features(args.recipe)
    t_features = time.time() - t0
    print(f"features of {sum(len(s[3]) for s in sites)} + {len(held[3])} reports: {t_features:.0f} s", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    for lr in (float(x) for x in args.fo_lrs.split(",")):
        curve = first_order(sites, held, n_rows, lr=lr, steps=args.fo_steps, every=max(1, args.fo_steps // 30))
        rows.append({"kind": "first_order", "lr": lr, "steps": args.fo_steps, "curve": curve})
        print(
            f"first-order lr {lr:g}: accuracy {curve[0]['accuracy']:.3f} -> {curve[-1]['accuracy']:.3f}",
            file=sys.stderr,
        )
    for codec in args.zo_codecs.split(","):
        size = None if codec == "exact" else codec_for(codec).blob_len(args.zo_local_steps, args.zo_probes)
        for seed in (int(s) for s in args.seeds.split(",")):
            curve = zeroth_order(
                sites, held, n_rows, rounds=args.zo_rounds, local_steps=args.zo_local_steps, probes=args.zo_probes,
                lr=args.zo_lr, eps=args.zo_eps, seed=seed, codec=codec,
            )  # fmt: skip
            rows.append({
                "kind": "zeroth_order", "seed": seed, "rounds": args.zo_rounds, "local_steps": args.zo_local_steps,
                "probes": args.zo_probes, "lr": args.zo_lr, "eps": args.zo_eps, "codec": codec,
                "scalars_per_site_round": args.zo_local_steps * args.zo_probes, "code_bytes_per_site_round": size,
                "curve": curve,
            })  # fmt: skip
            print(
                f"zeroth-order {codec} seed {seed}: accuracy "
                + " ".join(f"{p['accuracy']:.3f}" for p in curve)
                + f", choice loss {curve[-1]['choice_loss']:.3f}",
                file=sys.stderr,
            )
    rows.append({
        "kind": "meta", "recipe": _relative(args.recipe), "label_rows": n_rows, "hidden": int(held[0].shape[1]),
        "train_reports": [len(s[3]) for s in sites], "heldout_reports": len(held[3]),
        "features_s": round(t_features, 1), "wall_s": round(time.time() - t0, 1), "code": code_version(ROOT),
        "command": "python -m benchmarks.head_space " + " ".join(sys.argv[1:] if argv is None else argv),
    })  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""answer_loss equals the model's own loss while projecting only labelled positions."""

from __future__ import annotations

import torch

from edgetune.data.demo import demo_sites
from edgetune.data.prompts import TokenizedSet
from edgetune.models.loss import answer_loss
from edgetune.models.tiny import tiny_model_and_tokenizer


def test_answer_loss_matches_full_forward_loss_and_gradient():
    """Same value and same gradients as model(..., labels=...).loss on a padded batch."""
    model, tok = tiny_model_and_tokenizer(seed=3)
    batch = TokenizedSet(tok, list(demo_sites(1, facts_per_site=3)[0].train), 96).batch([0, 4, 7])
    ours = answer_loss(model, batch)
    ours.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = model(**batch).loss
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)

"""Synthetic hierarchy: ground truth of the generator, and MP-SAE vs TopK child recovery."""

import pytest
import torch

from probunroll import sae
from probunroll.data import make_hierarchy


def test_generator_ground_truth():
    kw = dict(n_samples=500, d=24, n_roots=4, branching=3, roots_per_sample=2)
    kw.update(parent_similarity=0.5, noise=0.0, random_state=1, dtype=torch.float64)
    h = make_hierarchy(**kw)
    F, P = h.features, h.parent
    torch.testing.assert_close(F.norm(dim=-1), torch.ones(16, dtype=torch.float64))
    roots, children = F[:4], F[4:]
    cos = (children * roots[P[4:]]).sum(-1)
    torch.testing.assert_close(cos, torch.full((12,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(h.x, h.codes @ F)
    active = h.codes != 0
    assert (active[:, :4].sum(-1) == 2).all()
    # a child fires only with its parent, one child per active parent
    for c in range(4, 16):
        assert active[active[:, c], P[c]].all()
    per_parent = active[:, 4:].reshape(500, 4, 3).sum(-1)
    assert torch.equal(per_parent, active[:, :4].long())
    again = make_hierarchy(**kw)
    assert torch.equal(again.x, h.x)


def test_generator_bad_input():
    with pytest.raises(ValueError, match="sibling_similarity"):
        make_hierarchy(sibling_similarity=1.0)
    with pytest.raises(ValueError, match="roots_per_sample"):
        make_hierarchy(n_roots=2, roots_per_sample=3)


def test_mp_recovers_children_better_than_topk_at_equal_l0():
    h = make_hierarchy(n_samples=4096, d=32, n_roots=8, branching=4, roots_per_sample=2,
                       sibling_similarity=0.6, parent_similarity=0.8, random_state=0)  # fmt: skip
    children = h.features[h.is_child]
    result = {}
    for name, model in (
        ("mp", sae.MatchingPursuitSAE(32, 64, 4, random_state=0)),
        ("topk", sae.TopKSAE(32, 64, 4, random_state=0)),
    ):
        sae.train(model, h.x, steps=600, batch_size=256, lr=1e-2, log_every=600)
        with torch.no_grad():
            l0 = float(sae.metrics.l0(model.encode(h.x)))
        result[name] = (sae.metrics.mcc(model.dictionary, children), l0)
    (mcc_mp, l0_mp), (mcc_topk, l0_topk) = result["mp"], result["topk"]
    assert l0_mp <= l0_topk  # MP spends at most the same budget (re-selections merge)
    assert mcc_mp > mcc_topk, result

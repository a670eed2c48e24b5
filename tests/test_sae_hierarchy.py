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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mp_recovers_children_better_than_topk_at_equal_l0(seed):
    """The MP-paper setting with the generator's defaults, nothing tuned: 8 roots × 4
    children in d = 32, every child orthogonalised against its parent (conditionally
    orthogonal, no tilt), coherent siblings, one concept tree (a root and one of its
    children) per sample; both SAEs with 64 atoms at k = 2 = the true L0.

    Measured (seeds 0–4, child MCC): MP 0.998 0.997 0.997 0.998 0.999, TopK 0.989 0.988
    0.947 0.971 0.986; MP wins on every seed. The claim does *not* extend to two trees per
    sample (``roots_per_sample=2``, k = 4): there TopK wins on every seed (means over seeds
    0–4: MP 0.771 vs TopK 0.906 with coherent siblings, 0.808 vs 0.877 without; still
    0.76 vs 0.91 at 4× the steps), in line with the SynthSAEBench critique that MP fits
    mixtures of co-active features (sae.md §B)."""
    h = make_hierarchy(random_state=seed)
    assert h.features.shape == (40, 32) and h.x.shape == (4096, 32)
    children = h.features[h.is_child]
    result = {}
    for name, model in (
        ("mp", sae.MatchingPursuitSAE(32, 64, 2, random_state=seed)),
        ("topk", sae.TopKSAE(32, 64, 2, random_state=seed)),
    ):
        sae.train(model, h.x, steps=600, batch_size=256, lr=1e-2, log_every=600)
        with torch.no_grad():
            l0 = float(sae.metrics.l0(model.encode(h.x)))
        result[name] = (sae.metrics.mcc(model.dictionary, children), l0)
    (mcc_mp, l0_mp), (mcc_topk, l0_topk) = result["mp"], result["topk"]
    assert l0_mp <= l0_topk  # MP spends at most the same budget (re-selections merge)
    assert mcc_mp > mcc_topk, result

"""Smoke training on sklearn's 8×8 digits (c = 256, trained at k = 5), calibrated against
``reference/sae.md`` §B (1500 steps there; 150 here, which already clears the bars)."""

import itertools

import pytest
import torch

from probunroll import sae
from probunroll.data import load_digits

K_TRAIN, KS = 5, (1, 2, 5, 10, 20)
STEPS = dict(steps=150, batch_size=128, lr=5e-3, log_every=150, random_state=0)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def curves(digits):
    x_train, x_test = digits
    mp_model = sae.MatchingPursuitSAE(64, 256, K_TRAIN, random_state=0)
    topk = sae.TopKSAE(64, 256, K_TRAIN, random_state=0)
    out = {}
    for name, model in (("mp", mp_model), ("topk", topk)):
        sae.train(model, x_train, **STEPS)
        with torch.no_grad():
            out[name] = [
                float(
                    sae.metrics.explained_variance(x_test, model.decode(model.encode(x_test, k=k)))
                )
                for k in KS
            ]
    return out


def test_mp_sae_explained_variance_and_monotone_in_k(curves):
    ev = curves["mp"]
    assert ev[KS.index(5)] >= 0.75, ev
    assert all(a < b for a, b in itertools.pairwise(ev)), ev


def test_topk_explained_variance(curves):
    assert curves["topk"][KS.index(5)] >= 0.70, curves["topk"]


def test_mp_beats_topk_when_k_doubles_at_inference(curves):
    i = KS.index(10)
    assert curves["mp"][i] >= curves["topk"][i] + 0.05, (curves["mp"], curves["topk"])


def test_auxk_reduces_dead_latents(digits):
    x_train, _ = digits
    dead = {}
    for coef in (0.0, 1.0):
        model = sae.TopKSAE(64, 256, K_TRAIN, aux_coef=coef, dead_after=10, random_state=0)
        sae.train(model, x_train, **STEPS)
        with torch.no_grad():
            dead[coef] = float(sae.metrics.dead_fraction(model.encode(x_train)))
    assert dead[1.0] < dead[0.0], dead


def test_demo_writes_plots_and_rows(tmp_path):
    rows = sae.demo(tmp_path, steps=20, verbose=False)
    assert len(rows) == 2 * len(KS)
    assert {r["model"] for r in rows} == {"MP-SAE", "TopK"}
    assert (tmp_path / "sae_pareto.png").stat().st_size > 0
    assert (tmp_path / "sae_atoms.png").stat().st_size > 0

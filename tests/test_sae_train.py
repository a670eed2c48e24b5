"""Trainer: kill-and-resume equals an uninterrupted run; 2-rank DDP equals one process."""

import io
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from probunroll import sae


def data(n=200, d=10, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make(kind):
    if kind == "mp":  # dropout exercises the RNG state in the checkpoint
        return sae.MatchingPursuitSAE(10, 24, 3, dropout=0.3, random_state=0, dtype=torch.float64)
    if kind == "topk":  # AuxK exercises the dead-latent buffer
        return sae.TopKSAE(10, 24, 3, dead_after=3, random_state=0, dtype=torch.float64)
    return sae.BatchTopKSAE(10, 24, 3, random_state=0, dtype=torch.float64)


class Killed(Exception):
    pass


def kill_at(n):
    def callback(step, model):
        if step == n:
            raise Killed

    return callback


def source(kind):
    """The training data as a fresh process would rebuild it: a tensor or a DataLoader."""
    if kind == "tensor":
        return data()
    dataset = torch.utils.data.TensorDataset(data())
    if kind == "loader":  # iter() draws a base seed from the global RNG
        return torch.utils.data.DataLoader(dataset, batch_size=64, drop_last=True)
    if kind == "shuffled":  # the loader's generator must be restored at the epoch start
        g = torch.Generator().manual_seed(7)
        return torch.utils.data.DataLoader(
            dataset, batch_size=64, shuffle=True, drop_last=True, generator=g
        )
    if kind == "noisy":  # a random transform drawing from the global RNG at every batch
        return torch.utils.data.DataLoader(
            dataset, batch_size=64, drop_last=True, collate_fn=noisy_collate
        )
    # shuffled without a generator: the sampler seeds itself from the global RNG
    return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, drop_last=True)


def noisy_collate(rows):
    x = torch.stack([r[0] for r in rows])
    return x + 0.1 * torch.randn(x.shape, dtype=x.dtype)


@pytest.mark.parametrize(
    "kind, src",
    [("mp", "tensor"), ("topk", "tensor"), ("batchtopk", "tensor"), ("mp", "loader"),
     ("mp", "shuffled"), ("mp", "shuffled-global"), ("mp", "noisy")],
)  # fmt: skip
def test_kill_and_resume_equals_uninterrupted(kind, src, tmp_path):
    kw = {"steps": 30, "batch_size": 64, "lr": 1e-2, "log_every": 5, "random_state": 3}
    ref = make(kind)
    ref_hist = sae.train(ref, source(src), **kw)

    run = make(kind)
    with pytest.raises(Killed):  # 3 batches an epoch: killed in epoch 5, resumed from epoch 3
        sae.train(
            run, source(src), checkpoint_dir=tmp_path, checkpoint_every=10,
            callback=kill_at(17), **kw,
        )  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-10"]
    resumed = make(kind)  # a fresh process would rebuild the model the same way
    torch.manual_seed(12345)  # the caller's RNG must not matter
    hist = sae.train(resumed, source(src), checkpoint_dir=tmp_path, checkpoint_every=10, **kw)
    for (key, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]
    assert (tmp_path / "ckpt-30" / "model.safetensors").is_file()
    loaded = sae.load(tmp_path / "ckpt-30")
    assert torch.equal(loaded.dictionary, ref.dictionary)


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, so that tqdm draws its bar."""

    def isatty(self):
        return True


def test_adamw_clipping_progress_and_resume(tmp_path, monkeypatch):
    def loader():
        dataset = torch.utils.data.TensorDataset(data())
        return torch.utils.data.DataLoader(dataset, batch_size=64, drop_last=True)

    def model():
        return sae.TopKSAE(10, 24, 3, random_state=0, dtype=torch.float64)

    max_norm = 0.05
    kw = {"steps": 8, "lr": 1e-2, "optimizer": "adamw", "weight_decay": 0.1, "log_every": 4,
          "init_from_data": False, "progress": True}  # fmt: skip
    grad_norms = []

    def record(step, m):  # the gradients the optimizer stepped with, after clipping
        grads = [p.grad.norm() for p in m.parameters() if p.grad is not None]
        grad_norms.append(float(torch.stack(grads).norm()))

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    ref = model()
    ref_hist = sae.train(ref, loader(), max_grad_norm=max_norm, callback=record, **kw)
    assert "TopKSAE" in err.getvalue() and "8/8" in err.getvalue()  # tqdm drew its bar

    # oracle: the same steps by hand, clip_grad_norm_ then AdamW, then the projection
    oracle = model()
    params = [p for p in oracle.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    batches = [b[0] for b in loader()] * 3
    unclipped = []
    for x in batches[:8]:
        loss, _ = oracle.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        unclipped.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
        opt.step()
        oracle.project_()
    assert min(unclipped) > 2 * max_norm  # every step was clipped ...
    torch.testing.assert_close(grad_norms, [max_norm] * 8, rtol=1e-4, atol=0)  # ... to max_norm
    for (key, a), b in zip(ref.state_dict().items(), oracle.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    free = model()  # and clipping changed the trajectory
    sae.train(free, loader(), **kw)
    assert not torch.equal(free.dictionary, ref.dictionary)

    with pytest.raises(Killed):
        sae.train(model(), loader(), max_grad_norm=max_norm, checkpoint_dir=tmp_path,
                  checkpoint_every=3, callback=kill_at(5), **kw)  # fmt: skip
    resumed = model()
    hist = sae.train(resumed, loader(), max_grad_norm=max_norm, checkpoint_dir=tmp_path, **kw)
    for (key, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    assert [h["loss"] for h in hist] == [h["loss"] for h in ref_hist]


def test_loader_input_and_history(tmp_path):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data()), batch_size=50)
    model = make("topk")
    hist = sae.train(model, loader, steps=12, lr=1e-2, log_every=4)
    assert [h["step"] for h in hist] == [4, 8, 12]
    assert set(hist[0]) >= {"step", "seconds", "loss", "mse", "l0", "explained_variance"}
    assert not model.training


def test_trainer_bad_input_mutates_nothing():
    model = make("mp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="data must have shape"):
        sae.train(model, data(d=7), steps=3)
    with pytest.raises(ValueError, match="lr"):
        sae.train(model, data(), steps=3, lr=0.0)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        sae.train(model, data(), steps=3, checkpoint_every=1)
    with pytest.raises(ValueError, match="distributed"):
        sae.train(model, data(), steps=3, distributed=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _init_gloo(rank, world, store):
    import datetime

    torch.set_num_threads(1)
    # A file store and the loopback interface: no TCP store thread, no port race, and no
    # dependence on how the machine's host name resolves.
    if os.path.isdir("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )


def _ddp_worker(rank, world, store, out):
    _init_gloo(rank, world, store)
    try:
        model = sae.MatchingPursuitSAE(10, 24, 3, random_state=0, dtype=torch.float64)
        sae.train(model, data(), steps=15, batch_size=64, lr=1e-2, random_state=1, distributed=True)
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_ddp_equals_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ddp_state = torch.load(out, weights_only=True)
    single = sae.MatchingPursuitSAE(10, 24, 3, random_state=0, dtype=torch.float64)
    sae.train(single, data(), steps=15, batch_size=64, lr=1e-2, random_state=1)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ddp_state[key], value, atol=1e-10, rtol=1e-10)


def _batchtopk_ddp_worker(rank, world, store, out):
    _init_gloo(rank, world, store)
    try:
        model = make("batchtopk")
        sae.train(model, data(), steps=1, batch_size=64, lr=1e-2, random_state=1, distributed=True)
        torch.save(model.threshold.clone(), f"{out}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_rank_batchtopk_threshold_averages_the_ranks(tmp_path):
    """Under DDP each rank keeps the top k·B/2 of its half of the global batch; the threshold's
    first update is the mean of the two halves' smallest kept activations on every rank (not
    rank 0's alone, which DDP's buffer broadcast would otherwise spread)."""
    from probunroll.sae.train import _TensorBatches

    out = str(tmp_path / "threshold")
    mp.spawn(_batchtopk_ddp_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    model = make("batchtopk")
    model.init_from_data_(data()[:4096], torch.Generator().manual_seed(1))
    batch = next(_TensorBatches(data(), 64, 1))
    with torch.no_grad():
        mins = []
        for half in (batch[:32], batch[32:]):
            z = model.batch_topk(model.pre_activations(half), model.k)
            mins.append(z[z > 0].min())
    assert not torch.isclose(mins[0], mins[1])  # rank 0's alone would differ
    expected = (mins[0] + mins[1]) / 2
    for threshold in got:
        torch.testing.assert_close(threshold, expected, rtol=1e-12, atol=1e-14)

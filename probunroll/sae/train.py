"""One minibatch trainer for every SAE: Adam(W), constraints after each step, logging,
checkpoints with exact resume, and optional DistributedDataParallel.

Exact resume: a checkpoint holds the model (safetensors + JSON config, as :func:`save`),
the optimizer state, the torch RNG state and the data position (epoch, offset). Batches of a
tensor dataset come from a per-epoch permutation seeded by ``(random_state, epoch)``, so a run
killed and resumed from its last checkpoint replays bit for bit on CPU. A loader runs on its
own CPU RNG stream seeded by ``(random_state, epoch)``, and a DataLoader's ``generator`` state
at the epoch start is checkpointed too, so the same holds for DataLoaders, shuffled or not.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from probunroll.sae.base import SparseAutoencoder
from probunroll.sae.io import load, save
from probunroll.sae.metrics import explained_variance

__all__ = ["train"]

_CKPT = re.compile(r"^ckpt-(\d+)$")
STATE = "trainer_state.pt"


class _TensorBatches:
    """Minibatches of a tensor: epoch e uses randperm(n) seeded by (seed, e); drops the tail."""

    def __init__(self, data: Tensor, batch_size: int, seed: int, epoch: int = 0, offset: int = 0):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.offset = epoch, offset
        self._perm = self._permutation()

    def _permutation(self) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.data.shape[0], generator=g)

    def __next__(self) -> Tensor:
        if self.offset + self.batch_size > self.data.shape[0]:
            self.epoch, self.offset = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.offset : self.offset + self.batch_size].to(self.data.device)
        self.offset += self.batch_size
        return self.data[idx]

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}


class _LoaderBatches:
    """Batches of a re-iterable loader; the position is (epoch, batches consumed).

    The loader runs on its own CPU RNG stream, reseeded by ``(seed, epoch)`` at each epoch
    start: a DataLoader's base seed, the seed its ``RandomSampler`` draws when it has no
    ``generator``, and random transforms in the main process then depend on the position
    alone, not on how much of the global RNG the model has used (a resumed run has used
    less), and the model's RNG stream does not depend on the loader. A loader's own
    ``generator`` is advanced by every epoch, so its state at the epoch start is part of the
    position and is restored on resume.
    """

    def __init__(
        self,
        loader: Iterable,
        seed: int = 0,
        epoch: int = 0,
        offset: int = 0,
        generator_state: Tensor | None = None,
    ):
        self.loader, self.seed, self.epoch, self.offset = loader, seed, epoch, offset
        self.generator = _loader_generator(loader)
        if generator_state is not None and self.generator is None:
            raise ValueError(
                "the checkpoint holds a loader generator state but the loader has no "
                "torch.Generator `generator`; resume with the loader the run started with"
            )
        self.generator_state = generator_state
        self._start()
        for _ in range(offset):  # replay the consumed part of the epoch
            if self._pull() is None:
                raise ValueError(f"the data loader has fewer than {offset} batches per epoch")

    def _start(self) -> None:
        if self.generator is not None:
            if self.generator_state is None:  # a new epoch: remember where it starts
                self.generator_state = self.generator.get_state()
            else:  # resuming mid-epoch: rewind the loader's generator to the epoch start
                self.generator.set_state(self.generator_state)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self._rng = g.get_state()
        self._it = self._in_stream(iter, self.loader)

    def _in_stream(self, fn: Callable, arg: Any) -> Any:
        """``fn(arg)`` with the global CPU RNG swapped for the loader's stream."""
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._rng)
            out = fn(arg)
            self._rng = torch.get_rng_state()
        return out

    def _pull(self) -> Any:
        return self._in_stream(lambda it: next(it, None), self._it)

    def __next__(self) -> Tensor:
        batch = self._pull()
        if batch is None:
            self.epoch, self.offset, self.generator_state = self.epoch + 1, 0, None
            self._start()
            batch = self._pull()
            if batch is None:
                raise ValueError("the data loader yields no batches")
        self.offset += 1
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def position(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "generator_state": self.generator_state}


def _loader_generator(loader: Iterable) -> torch.Generator | None:
    """The loader's own ``torch.Generator`` (DataLoader's ``generator``), if it has one."""
    g = getattr(loader, "generator", None)
    return g if isinstance(g, torch.Generator) else None


def _first_batch(loader: Iterable, seed: int) -> Tensor:
    """Epoch 0's first batch, leaving the loader's generator as it was."""
    g = _loader_generator(loader)
    state = None if g is None else g.get_state()
    try:
        return next(_LoaderBatches(loader, seed))
    finally:
        if g is not None:
            g.set_state(state)


class _LossModule(nn.Module):
    """Puts ``model.loss`` behind ``forward`` so that DDP's hooks see it."""

    def __init__(self, model: SparseAutoencoder):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        return self.model.loss(x)


def _latest_checkpoint(directory: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in directory.glob("ckpt-*") if (m := _CKPT.match(p.name))]
    found = [(s, p) for s, p in found if (p / STATE).is_file()]
    return max(found)[1] if found else None


def _write_checkpoint(directory: Path, step: int, model: SparseAutoencoder, state: dict) -> None:
    tmp = directory / f"ckpt-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save(model, tmp)
    torch.save(state, tmp / STATE)
    final = directory / f"ckpt-{step}"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # atomic: a half-written checkpoint is never picked up
    for old in directory.glob("ckpt-*"):
        m = _CKPT.match(old.name)
        if m and int(m.group(1)) < step:
            shutil.rmtree(old, ignore_errors=True)


def _make_optimizer(name: str | Callable, params: list, lr: float, weight_decay: float):
    if callable(name):
        return name(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam', 'adamw' or a callable, got {name!r}")


def _validate(model, data, steps, batch_size, lr, log_every, checkpoint_every, checkpoint_dir):
    if not isinstance(model, SparseAutoencoder):
        raise ValueError(
            f"model must be a probunroll SparseAutoencoder, got {type(model).__name__}"
        )
    for name, v in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if checkpoint_every is not None and (
        not isinstance(checkpoint_every, int) or checkpoint_every < 1
    ):
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs a checkpoint_dir")
    if isinstance(data, Tensor):
        if data.dim() != 2 or data.shape[1] != model.d:
            raise ValueError(f"data must have shape (N, {model.d}), got {tuple(data.shape)}")
        if data.shape[0] < batch_size:
            raise ValueError(f"data has {data.shape[0]} rows, fewer than batch_size={batch_size}")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("data contains NaN or Inf")
    elif not isinstance(data, Iterable):
        raise ValueError("data must be a (N, d) tensor or a re-iterable loader of batches")


def train(
    model: SparseAutoencoder,
    data: Tensor | Iterable,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    *,
    optimizer: str | Callable = "adam",
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    log_every: int = 100,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    random_state: int = 0,
    init_from_data: bool = True,
    distributed: bool = False,
    progress: bool | None = None,
    callback: Callable[[int, SparseAutoencoder], None] | None = None,
) -> list[dict[str, Any]]:
    """Train an SAE in place with minibatch Adam; returns the logged history.

    Each step: loss (the model's :meth:`~SparseAutoencoder.loss`), backward, optional gradient
    clipping, optimizer step, then :meth:`~SparseAutoencoder.project_` (unit-norm atoms,
    simplex rows, ...).

    Parameters
    ----------
    model : SparseAutoencoder
        Trained in place.
    data : Tensor or iterable
        A (N, d) tensor (shuffled per epoch with a seeded permutation, last partial batch
        dropped) or a re-iterable loader of (B, d) batches (or tuples whose first item is
        the batch). Batches are moved to the model's device and dtype. A loader is iterated
        with the global CPU RNG swapped for its own stream, reseeded by ``(random_state,
        epoch)`` at each epoch, so a ``DataLoader`` shuffled without a ``generator`` (its
        sampler seeds itself from that stream) and random transforms in the main process
        are reproducible and resume exactly. A ``DataLoader``'s ``generator`` is
        checkpointed at each epoch start and rewound on resume. Exact resume needs a loader
        whose epochs depend only on those: not on its own hidden RNG, on
        ``persistent_workers`` carrying worker RNG across epochs, or on CUDA RNG.
    steps : int
        Total optimizer steps (a resumed run continues up to this number).
    batch_size : int
        Rows per step for tensor data; under ``distributed`` it is the global batch, split
        evenly across ranks.
    lr : float
        Learning rate.
    optimizer : {"adam", "adamw"} or callable
        A callable receives the parameter list and returns an optimizer.
    weight_decay : float, default 0
    max_grad_norm : float, optional
        Clip the global gradient norm.
    log_every : int, default 100
        Steps between history entries (loss, mse, l0, batch explained variance, seconds).
    checkpoint_dir : path, optional
        Directory of checkpoints ``ckpt-<step>/`` (model.safetensors, config.json,
        trainer_state.pt); the newest complete one is resumed when ``resume`` is true.
    checkpoint_every : int, optional
        Steps between checkpoints (default: only at the end when ``checkpoint_dir`` is set).
    resume : bool, default True
        Continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
    random_state : int, default 0
        Seeds the batch order, the data-dependent init and the torch RNG used during training
        (the caller's global RNG is left untouched).
    init_from_data : bool, default True
        On a fresh start call ``model.init_from_data_`` on (up to 4096 rows of) the data.
    distributed : bool, default False
        Wrap the model in DistributedDataParallel; the process group must be initialised.
        Every rank draws the same global batch and trains on its slice.
    progress : bool, optional
        tqdm bar; None shows it only on a terminal.
    callback : callable, optional
        ``callback(step, model)`` after every step.

    Returns
    -------
    list of dict
        The history, including entries restored from a checkpoint.
    """
    from tqdm.auto import tqdm

    _validate(model, data, steps, batch_size, lr, log_every, checkpoint_every, checkpoint_dir)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    rank, world = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialised torch.distributed process group"
            )
        rank, world = dist.get_rank(), dist.get_world_size()
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} is not divisible by the world size {world}")
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    if ckpt_dir is not None and rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(optimizer, params, lr, weight_decay)
    latest = _latest_checkpoint(ckpt_dir) if ckpt_dir is not None and resume else None
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        if latest is not None:
            state = torch.load(latest / STATE, weights_only=True)
            model.load_state_dict(load(latest).state_dict())
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng_cpu"])
            if devices and state.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(state["rng_cuda"], devices[0])
            start, history, position = state["step"], state["history"], state["data"]
        else:
            torch.manual_seed(random_state)
            start, history, position = 0, [], {"epoch": 0, "offset": 0}
        if latest is None and init_from_data:  # before the batches: the first training batch
            sample = data[:4096] if isinstance(data, Tensor) else _first_batch(data, random_state)
            g = torch.Generator().manual_seed(random_state)
            model.init_from_data_(sample.to(device=device, dtype=dtype), g)
        if isinstance(data, Tensor):
            epoch, offset = position["epoch"], position["offset"]
            batches: Any = _TensorBatches(data, batch_size, random_state, epoch, offset)
        else:
            batches = _LoaderBatches(data, random_state, **position)

        runner: nn.Module = _LossModule(model)
        if distributed:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(runner, device_ids=devices or None)
        model.train()
        t0 = time.perf_counter() - (history[-1]["seconds"] if history else 0.0)
        bar = tqdm(total=steps, initial=start, disable=None if progress is None else not progress,
                   desc=type(model).__name__, leave=False)  # fmt: skip
        for step in range(start + 1, steps + 1):
            x = next(batches).to(device=device, dtype=dtype)
            if world > 1:
                x = x[rank * (x.shape[0] // world) : (rank + 1) * (x.shape[0] // world)]
            loss, parts = runner(x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            model.project_()
            bar.update(1)
            if step % log_every == 0 or step == steps:
                with torch.no_grad():
                    x_hat = model.decode(parts["codes"])
                    entry = {"step": step, "seconds": time.perf_counter() - t0,
                             "loss": float(loss.detach()), "mse": float(parts["mse"].detach()),
                             "l0": float((parts["codes"] != 0).sum(-1).double().mean()),
                             "explained_variance": float(explained_variance(x, x_hat))}  # fmt: skip
                history.append(entry)
                bar.set_postfix(
                    loss=f"{entry['loss']:.4g}", ev=f"{entry['explained_variance']:.3f}"
                )
            if ckpt_dir is not None and (
                step == steps or (checkpoint_every is not None and step % checkpoint_every == 0)
            ):
                if rank == 0:
                    state = {"step": step, "optimizer": opt.state_dict(),
                             "rng_cpu": torch.get_rng_state(),
                             "rng_cuda": torch.cuda.get_rng_state(devices[0]) if devices else None,
                             "data": batches.position(), "history": history}  # fmt: skip
                    _write_checkpoint(ckpt_dir, step, model, state)
                if world > 1:
                    dist.barrier()
            if callback is not None:
                callback(step, model)
        bar.close()
    model.eval()
    return history

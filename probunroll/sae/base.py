"""The shared base of every sparse autoencoder: config capture, decode, loss, constraints."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = ["SparseAutoencoder", "as_generator", "random_unit_rows"]


def as_generator(random_state: int | torch.Generator | None) -> torch.Generator:
    """A CPU ``torch.Generator`` from an int seed, a generator, or None (fresh entropy)."""
    if isinstance(random_state, torch.Generator):
        return random_state
    g = torch.Generator()
    if random_state is None:
        g.seed()
    elif isinstance(random_state, int) and not isinstance(random_state, bool):
        g.manual_seed(random_state)
    else:
        raise ValueError(
            f"random_state must be an int, a torch.Generator or None, got {random_state!r}"
        )
    return g


def random_unit_rows(
    c: int, d: int, generator: torch.Generator, dtype: torch.dtype, device: Any = None
) -> Tensor:
    """``c`` Gaussian directions in R^d normalised to unit length (drawn on CPU, then moved)."""
    w = torch.randn(c, d, generator=generator, dtype=torch.float64)
    return (w / w.norm(dim=-1, keepdim=True)).to(dtype=dtype, device=device)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class SparseAutoencoder(nn.Module):
    r"""Base class: x̂ = z D + b_dec with D (c, d) one atom per row.

    Subclasses implement :meth:`encode` and may extend :meth:`loss` and :meth:`project_`.
    The constructor arguments are recorded (``self.config``) so that
    :func:`probunroll.sae.save` can rebuild the module from JSON.

    Parameters
    ----------
    d : int
        Input dimension.
    c : int
        Number of latents (atoms).
    dtype : torch.dtype, default torch.float32
    device : optional
    """

    registry: ClassVar[dict[str, type[SparseAutoencoder]]] = {}
    #: whether :meth:`project_` renormalises the decoder rows to unit norm after each step
    unit_norm_decoder: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        SparseAutoencoder.registry[cls.__name__] = cls

    def __init__(self, d: int, c: int, *, dtype: torch.dtype = torch.float32, device: Any = None):
        super().__init__()
        self.d = _positive_int(d, "d")
        self.c = _positive_int(c, "c")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.config: dict[str, Any] = {"d": d, "c": c, "dtype": str(dtype).removeprefix("torch.")}
        self.b_dec = nn.Parameter(torch.zeros(d, dtype=dtype, device=device))

    # ------------------------------------------------------------------ interface
    @property
    def dictionary(self) -> Tensor:
        """The decoder atoms, (c, d), one per row."""
        return self.W_dec

    def encode(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Codes z (B, c) for inputs x (B, d)."""
        raise NotImplementedError

    def decode(self, z: Tensor) -> Tensor:
        r"""x̂ = z D + b_dec."""
        return z @ self.dictionary + self.b_dec

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruction and codes: ``(x_hat, codes)``."""
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        r"""Training loss and its parts; the base loss is ‖x − x̂‖² summed over features and
        averaged over the batch."""
        x_hat, z = self(x)
        mse = ((x - x_hat) ** 2).sum(-1).mean()
        return mse, {"mse": mse, "codes": z}

    @torch.no_grad()
    def project_(self) -> None:
        """Restore the constraints after an optimizer step (unit-norm atoms by default)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def init_from_data_(self, x: Tensor, generator: torch.Generator) -> None:
        """Data-dependent initialisation before training: b_dec at the data mean."""
        self.b_dec.copy_(x.mean(0))

    # ------------------------------------------------------------------ helpers
    def _check_input(self, x: Tensor, name: str = "x") -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.d:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (B, {self.d}), got {shape}")
        if x.dtype != self.b_dec.dtype:
            raise ValueError(f"{name} has dtype {x.dtype}, the model {self.b_dec.dtype}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SparseAutoencoder:
        """Build an (untrained) module from a config written by :meth:`config`."""
        cfg = dict(config)
        cfg["dtype"] = getattr(torch, cfg["dtype"])
        return cls(**cfg)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())

r"""Kernel similarity matching (KSM): sparse coding with the dictionary eliminated.

Choudhary, Masset & Ba, "Implicit Generative Modeling by Kernel Similarity Matching",
arXiv:2503.00655 (2025).

The paper's body was not available to us (only its abstract); the formulation below is our
reconstruction from the abstract and the sparse-coding lineage it cites (Olshausen & Field
1996; Tolooshams & Ba 2021), and the ADMM splitting is ours. Notation follows the paper's
column convention: data :math:`X\in\mathbb{R}^{d\times N}`, codes
:math:`Z\in\mathbb{R}^{k\times N}` (one column per sample).

Objective. Sparse coding with a Frobenius (weight-decay) penalty on the dictionary,

.. math::
    L(A, Z) = \tfrac12\|X - AZ\|_F^2 + \tfrac{\omega}{2}\|A\|_F^2 + \lambda\|Z\|_1,

is minimised in A by :math:`A^\star = XZ^\top(ZZ^\top + \omega I_k)^{-1}
= X(K_z + \omega I_N)^{-1}Z^\top`, which leaves the kernel objective

.. math::
    F(Z) = \tfrac{\omega}{2}\operatorname{tr}\big(K_x (K_z + \omega I_N)^{-1}\big) + \lambda\|Z\|_1
         = \tfrac12\operatorname{tr}K_x - \tfrac12\langle K_x, K_z(K_z+\omega I)^{-1}\rangle_F
           + \lambda\|Z\|_1,

with :math:`K_x = X^\top X` and :math:`K_z = Z^\top Z`. X enters only through :math:`K_x`, so
any PSD kernel may replace it (RBF for manifolds). Minimising F maximises the alignment of the
input kernel with the "hat-normalised" latent kernel: the KSM statement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from probunroll._params import ParamsMixin
from probunroll.linalg.prox import project_l2_ball
from probunroll.models._validation import as_data_matrix

__all__ = [
    "KSMResult",
    "KernelSimilarityMatching",
    "coverage",
    "ksm_admm",
    "ksm_code_step",
    "ksm_objective",
    "linear_kernel",
    "localization",
    "rbf_kernel",
    "sparse_coding_objective",
]


# ---------------------------------------------------------------------------------------------
# kernels and objectives
# ---------------------------------------------------------------------------------------------


def linear_kernel(X: Tensor, Y: Tensor | None = None) -> Tensor:
    """Linear kernel ``X @ Y.T`` between rows of ``X`` (n, d) and ``Y`` (m, d)."""
    Y = X if Y is None else Y
    return X @ Y.T


def rbf_kernel(X: Tensor, Y: Tensor | None = None, sigma: float = 1.0) -> Tensor:
    r"""Gaussian kernel :math:`\exp(-\|x - y\|^2 / (2\sigma^2))` between rows of X and Y."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    Y = X if Y is None else Y
    d2 = (X.pow(2).sum(-1)[:, None] + Y.pow(2).sum(-1)[None, :] - 2 * X @ Y.T).clamp(min=0)
    return torch.exp(-d2 / (2 * sigma**2))


def _ridge_gram(Z: Tensor, omega: float) -> Tensor:
    """:math:`ZZ^\\top + \\omega I_k` (the anti-Hebbian matrix M)."""
    return Z @ Z.T + omega * torch.eye(Z.shape[0], dtype=Z.dtype, device=Z.device)


def ksm_objective(Z: Tensor, Kx: Tensor, omega: float, lam: float) -> Tensor:
    r"""Kernel objective F(Z) in its Woodbury (k×k) form.

    .. math::
        F(Z) = \tfrac12\big[\operatorname{tr}K_x
               - \operatorname{tr}\big(ZK_xZ^\top(ZZ^\top+\omega I_k)^{-1}\big)\big]
               + \lambda\|Z\|_1

    which equals :math:`\tfrac{\omega}{2}\operatorname{tr}(K_x(Z^\top Z+\omega I_N)^{-1})
    + \lambda\|Z\|_1` (push-through identity) but costs O(N²k + k³).

    Parameters
    ----------
    Z : Tensor, shape (k, N)
        Codes, one column per sample.
    Kx : Tensor, shape (N, N)
        Input kernel (PSD).
    omega, lam : float
        Dictionary weight decay ω > 0 and sparsity weight λ ≥ 0.
    """
    M = _ridge_gram(Z, omega)
    B = Z @ Kx @ Z.T
    fit = torch.trace(Kx) - torch.trace(torch.linalg.solve(M, B))
    return 0.5 * fit + lam * Z.abs().sum()


def sparse_coding_objective(X: Tensor, A: Tensor, Z: Tensor, omega: float, lam: float) -> Tensor:
    r"""Explicit objective :math:`\tfrac12\|X-AZ\|_F^2 + \tfrac{\omega}{2}\|A\|_F^2
    + \lambda\|Z\|_1` with X (d, N), A (d, k), Z (k, N); the oracle for :func:`ksm_objective`."""
    return 0.5 * (X - A @ Z).pow(2).sum() + 0.5 * omega * A.pow(2).sum() + lam * Z.abs().sum()


# ---------------------------------------------------------------------------------------------
# ADMM
# ---------------------------------------------------------------------------------------------


@dataclass
class KSMResult:
    """Output of :func:`ksm_admm`.

    Attributes
    ----------
    codes : Tensor, shape (k, N)
        The feasible (sparse, constrained) split variable V at the last iteration.
    G : Tensor, shape (N, k)
        Representer weights of the decoder, :math:`A = \\Phi(X)G`.
    objective : list of float
        F(V) after each iteration.
    primal_residual : list of float
        :math:`\\|Z - V\\|_F / \\max(1, \\|V\\|_F)` after each iteration.
    """

    codes: Tensor
    G: Tensor
    objective: list[float] = field(default_factory=list)
    primal_residual: list[float] = field(default_factory=list)


def _make_prox(lam: float, rho: float, nonneg: bool, l2_ball: bool):
    """Prox of (λ/ρ)‖·‖₁ + ι(z ≥ 0) + ι(‖z_i‖₂ ≤ 1) column-wise: threshold, then project.

    For nonneg ℓ1 followed by the ℓ2-ball projection the composition is the exact prox
    (the ball projection of a soft-thresholded vector; Yu 2013, "On decomposing the
    proximal map")."""
    thr = lam / rho

    def prox(v: Tensor) -> Tensor:
        if nonneg:
            v = torch.clamp(v - thr, min=0)
        else:
            v = torch.sign(v) * torch.clamp(v.abs() - thr, min=0)
        if l2_ball:
            v = project_l2_ball(v, 1.0, dim=0)
        return v

    return prox


def ksm_code_step(G: Tensor, Kx: Tensor, Kxy: Tensor, V: Tensor, U: Tensor, rho: float) -> Tensor:
    r"""Quadratic code step of the ADMM.

    With the decoder :math:`A = \Phi(X)G` fixed, the code of data with kernel columns
    :math:`K_{X,Y} = \Phi(X)^\top\Phi(Y)` solves the k×k SPD systems

    .. math:: (G^\top K_x G + \rho I_k)\,Z = G^\top K_{X,Y} + \rho (V - U),

    done with one Cholesky factorisation for all columns.
    """
    k = G.shape[1]
    H = G.T @ Kx @ G + rho * torch.eye(k, dtype=G.dtype, device=G.device)
    L = torch.linalg.cholesky(H)
    return torch.cholesky_solve(G.T @ Kxy + rho * (V - U), L)


def _code_prox_dual(G, Kx, Kxy, V, U, rho, prox):
    """ADMM steps 2–4 with the decoder G fixed: returns the new (Z, V, U)."""
    Z = ksm_code_step(G, Kx, Kxy, V, U, rho)
    V = prox(Z + U)
    return Z, V, U + Z - V


def ksm_admm(
    Kx: Tensor,
    n_components: int,
    omega: float = 0.1,
    lam: float = 0.01,
    rho: float = 1.0,
    n_iter: int = 300,
    nonneg: bool = True,
    l2_ball: bool = False,
    Z0: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> KSMResult:
    r"""Minimise the KSM objective by ADMM on the split Z = V.

    The decoder is kept in representer form :math:`A = \Phi(X)G`, so only kernels appear.
    Per iteration (our splitting, [R]):

    1. decoder step (closed form): :math:`G = V^\top(VV^\top + \omega I_k)^{-1}`, i.e.
       :math:`A = A^\star(V)`, the exact minimiser of L(A, V) (push-through form: only k×k
       inverses);
    2. code step (quadratic): :math:`(G^\top K_xG + \rho I)Z = G^\top K_x + \rho(V - U)`
       (:func:`ksm_code_step`);
    3. prox step: :math:`V = \operatorname{prox}_{(\lambda/\rho)\|\cdot\|_1 + \iota_C}(Z + U)`,
       C = {z ≥ 0} and/or {‖z_i‖₂ ≤ 1} per column (the "metabolic" prior of the manifold
       variant);
    4. dual step: :math:`U \leftarrow U + Z - V`.

    Cost O(N²k + k³) per iteration. The objective is reported at the feasible V.

    Parameters
    ----------
    Kx : Tensor, shape (N, N)
        Input kernel.
    n_components : int
        Latent dimension k.
    omega : float
        Dictionary weight decay ω > 0.
    lam : float
        Sparsity weight λ ≥ 0.
    rho : float
        ADMM penalty ρ > 0.
    n_iter : int
        Iterations.
    nonneg, l2_ball : bool
        Constrain codes to z ≥ 0, and each code to the unit ℓ2 ball.
    Z0 : Tensor, shape (k, N), optional
        Initial codes; default |N(0, 1)|/√k drawn with ``generator``.
    generator : torch.Generator, optional
        Source of the random initial codes.

    Returns
    -------
    KSMResult
    """
    _check_kernel(Kx, "Kx")
    N = Kx.shape[0]
    _check_hyper(n_components, omega, lam, rho, n_iter)
    if Z0 is None:
        Z0 = torch.randn(n_components, N, generator=generator, dtype=Kx.dtype).to(Kx.device)
        Z0 = Z0.abs() / math.sqrt(n_components) if nonneg else Z0 / math.sqrt(n_components)
    elif Z0.shape != (n_components, N):
        raise ValueError(f"Z0 must have shape ({n_components}, {N}), got {tuple(Z0.shape)}")
    prox = _make_prox(lam, rho, nonneg, l2_ball)
    V = Z0.clone()
    U = torch.zeros_like(V)
    res = KSMResult(codes=V, G=V.T)
    for _ in range(n_iter):
        G = torch.linalg.solve(_ridge_gram(V, omega), V).T
        Z, V, U = _code_prox_dual(G, Kx, Kx, V, U, rho, prox)
        res.objective.append(float(ksm_objective(V, Kx, omega, lam)))
        res.primal_residual.append(float((Z - V).norm() / max(1.0, float(V.norm()))))
    res.codes = V
    res.G = torch.linalg.solve(_ridge_gram(V, omega), V).T
    return res


# ---------------------------------------------------------------------------------------------
# estimator
# ---------------------------------------------------------------------------------------------


class KernelSimilarityMatching(ParamsMixin):
    r"""Kernel similarity matching (arXiv:2503.00655): sparse codes whose latent kernel matches
    the input kernel, with an implicit (kernel-ridge) generative decoder.

    Parameters
    ----------
    n_components : int
        Latent dimension k.
    kernel : {"linear", "rbf"}
        Input kernel :math:`K_x`.
    sigma : float
        RBF bandwidth (ignored for the linear kernel).
    omega : float
        Dictionary weight decay ω.
    lam : float
        Sparsity weight λ.
    rho : float
        ADMM penalty.
    n_iter : int
        ADMM iterations in ``fit`` (and in ``transform``).
    nonneg, l2_ball : bool
        Code constraints; ``nonneg=True, l2_ball=True`` is the "metabolic" manifold prior.
    random_state : int, optional
        Seed for the initial codes.
    dtype : torch.dtype
        Working precision.

    Attributes
    ----------
    codes_ : Tensor, shape (N, k)
        Training codes (rows; the transpose of the paper's Z).
    G_ : Tensor, shape (N, k)
        Representer weights, :math:`A^\star = \Phi(X)G`.
    X_fit_ : Tensor, shape (N, d)
        Training data (the decoder is implicit: it is stored data, not parameters).
    objective_ : list of float
        F per ADMM iteration.
    primal_residual_ : list of float
        Relative ‖Z − V‖ per iteration.

    References
    ----------
    S. Choudhary, P. Masset, D. Ba. Implicit Generative Modeling by Kernel Similarity
    Matching. arXiv:2503.00655, 2025.

    Examples
    --------
    >>> import torch
    >>> X = torch.randn(50, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> ksm = KernelSimilarityMatching(8, n_iter=50, random_state=0).fit(X)
    >>> ksm.transform(X[:3]).shape
    torch.Size([3, 8])
    """

    def __init__(
        self,
        n_components: int,
        kernel: str = "linear",
        sigma: float = 1.0,
        omega: float = 0.1,
        lam: float = 0.01,
        rho: float = 1.0,
        n_iter: int = 300,
        nonneg: bool = True,
        l2_ball: bool = False,
        random_state: int | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.n_components = n_components
        self.kernel = kernel
        self.sigma = sigma
        self.omega = omega
        self.lam = lam
        self.rho = rho
        self.n_iter = n_iter
        self.nonneg = nonneg
        self.l2_ball = l2_ball
        self.random_state = random_state
        self.dtype = dtype

    def _kernel(self, X: Tensor, Y: Tensor | None = None) -> Tensor:
        if self.kernel == "linear":
            return linear_kernel(X, Y)
        return rbf_kernel(X, Y, self.sigma)

    def fit(self, X: Any, y: Any = None) -> KernelSimilarityMatching:
        """Fit codes and the implicit decoder to data ``X`` of shape (N, d) (``y`` ignored)."""
        if self.kernel not in ("linear", "rbf"):
            raise ValueError(f"kernel must be 'linear' or 'rbf', got {self.kernel!r}")
        X = _as_data(X, "X", self.dtype)
        gen = torch.Generator().manual_seed(0 if self.random_state is None else self.random_state)
        res = ksm_admm(
            self._kernel(X),
            self.n_components,
            omega=self.omega,
            lam=self.lam,
            rho=self.rho,
            n_iter=self.n_iter,
            nonneg=self.nonneg,
            l2_ball=self.l2_ball,
            generator=gen,
        )
        self.X_fit_ = X
        self.n_features_in_ = int(X.shape[1])
        self.codes_ = res.codes.T
        self.G_ = res.G
        self.objective_ = res.objective
        self.primal_residual_ = res.primal_residual
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "G_"):
            raise RuntimeError("KernelSimilarityMatching is not fitted; call fit first")

    def fit_transform(self, X: Any, y: Any = None) -> Tensor:
        """Fit to ``X`` and return its training codes ``codes_`` (N, k), optimised jointly with
        the decoder; :meth:`transform` would re-solve them with the decoder frozen."""
        return self.fit(X, y).codes_

    def transform(self, X: Any) -> Tensor:
        """Codes (n, k) of new data with the decoder frozen (ADMM code/prox/dual steps)."""
        self._check_fitted()
        X = _as_data(X, "X", self.dtype)
        if X.shape[1] != self.X_fit_.shape[1]:
            raise ValueError(
                f"X has {X.shape[1]} features, but KernelSimilarityMatching is expecting "
                f"{self.n_features_in_} features as input"
            )
        Kxy = self._kernel(self.X_fit_, X)
        Kx = self._kernel(self.X_fit_)
        prox = _make_prox(self.lam, self.rho, self.nonneg, self.l2_ball)
        V = torch.zeros(self.n_components, X.shape[0], dtype=self.dtype)
        U = torch.zeros_like(V)
        for _ in range(self.n_iter):
            _, V, U = _code_prox_dual(self.G_, Kx, Kxy, V, U, self.rho, prox)
        return V.T

    def decode(self, codes: Any) -> Tensor:
        r"""Implicit decoder :math:`\hat x(z) = X(K_z + \omega I)^{-1}Z^\top z`: kernel-ridge
        regression from latents to inputs, for codes of shape (n, k); returns (n, d)."""
        self._check_fitted()
        codes = _as_data(codes, "codes", self.dtype)
        if codes.shape[1] != self.n_components:
            raise ValueError(f"codes must have {self.n_components} columns, got {codes.shape[1]}")
        Z = self.codes_.T
        A = torch.linalg.solve(_ridge_gram(Z, self.omega), Z @ self.X_fit_).T  # (d, k)
        return codes @ A.T

    def hebbian_weights(self) -> tuple[Tensor, Tensor]:
        r"""Circuit view of the optimal decoder, :math:`A^\star = WM^{-1}`.

        Returns
        -------
        W : Tensor, shape (d, k)
            Feed-forward Hebbian weights :math:`W = XZ^\top` (input–latent correlations).
        M : Tensor, shape (k, k)
            Lateral anti-Hebbian weights :math:`M = ZZ^\top + \omega I` (latent
            correlations), as in similarity matching (Pehlevan et al. 2018).
        """
        self._check_fitted()
        Z = self.codes_.T
        return self.X_fit_.T @ Z.T, _ridge_gram(Z, self.omega)


# ---------------------------------------------------------------------------------------------
# manifold diagnostics
# ---------------------------------------------------------------------------------------------


def localization(codes: Tensor, angles: Tensor, half_width: float = math.pi / 4) -> Tensor:
    """Per-unit localisation on a ring: the fraction of each unit's response mass within
    ±``half_width`` (radians) of its peak angle; 0 for a unit that never responds.

    ``codes`` is (N, k) non-negative, ``angles`` is (N,)."""
    mass = codes.abs()
    total = mass.sum(0)
    peak = angles[mass.argmax(0)]
    diff = torch.remainder(angles[:, None] - peak[None, :] + math.pi, 2 * math.pi) - math.pi
    near = (mass * (diff.abs() <= half_width)).sum(0)
    return torch.where(total > 0, near / total.clamp(min=torch.finfo(codes.dtype).tiny), 0.0)


def coverage(codes: Tensor, rel_tol: float = 1e-3) -> float:
    """Fraction of samples whose code has some unit above ``rel_tol`` × the largest response."""
    thr = rel_tol * codes.abs().max()
    return float((codes.abs().amax(1) > thr).double().mean())


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------


def _as_data(X: Any, name: str, dtype: torch.dtype) -> Tensor:
    """``X`` (n_samples, n_features) as a CPU tensor in ``dtype``, checked by the estimators'
    shared validator (:func:`probunroll.models._validation.as_data_matrix`)."""
    return as_data_matrix(name, X, dtype, torch.device("cpu"))


def _check_kernel(K: Tensor, name: str) -> None:
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"{name} must be a square (N, N) kernel matrix, got {tuple(K.shape)}")
    if not torch.isfinite(K).all():
        raise ValueError(f"{name} contains NaN or Inf")


def _check_hyper(k: int, omega: float, lam: float, rho: float, n_iter: int) -> None:
    if int(k) != k or k < 1:
        raise ValueError(f"n_components must be a positive integer, got {k}")
    if omega <= 0:
        raise ValueError(f"omega must be positive, got {omega}")
    if lam < 0:
        raise ValueError(f"lam must be non-negative, got {lam}")
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    if n_iter < 1:
        raise ValueError(f"n_iter must be at least 1, got {n_iter}")

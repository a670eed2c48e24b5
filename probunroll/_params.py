"""Hyperparameter access for the scikit-learn style estimators, without scikit-learn.

The estimators store every ``__init__`` argument verbatim under its own name (the scikit-learn
convention), so their hyperparameters are read off the ``__init__`` signature. This gives
``get_params`` / ``set_params`` with scikit-learn's semantics (nested ``outer__inner`` keys for
estimator-valued parameters), which is what ``sklearn.base.clone``, ``GridSearchCV`` and
``cross_val_score`` call, and a ``repr`` that lists the arguments that differ from their defaults.
scikit-learn stays an optional extra: nothing here imports it.

Reference: scikit-learn's developer guide, "Developing scikit-learn estimators" (``get_params``
and ``set_params``).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


def _init_parameters(cls: type) -> list[inspect.Parameter]:
    """The ``__init__`` parameters of ``cls`` in signature order (no ``self``, no ``*args``)."""
    init = cls.__init__
    if init is object.__init__:
        return []
    params = []
    for p in inspect.signature(init).parameters.values():
        if p.name == "self":
            continue
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TypeError(f"{cls.__name__}.__init__ must not take *args or **kwargs")
        params.append(p)
    return params


def _same(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` are the same hyperparameter value (tensors and arrays by value)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and bool((a == b).all())
        )
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # numpy arrays and other objects without a scalar ==
        return False


class ParamsMixin:
    """``get_params``, ``set_params``, scikit-learn's estimator tags and a parameter ``repr``
    for an estimator whose ``__init__`` stores each argument as an attribute of the same name.

    ``_allows_nan`` (class attribute) says whether the estimator takes NaN as a missing entry.
    """

    _allows_nan: bool = False

    @classmethod
    def _get_param_names(cls) -> list[str]:
        return [p.name for p in _init_parameters(cls)]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The estimator's hyperparameters, ``{name: value}`` in ``__init__`` order.

        With ``deep=True`` a parameter that is itself an estimator (has ``get_params``) also
        contributes its own parameters as ``name__sub``.
        """
        out: dict[str, Any] = {}
        for name in self._get_param_names():
            value = getattr(self, name)
            if deep and hasattr(value, "get_params") and not isinstance(value, type):
                for sub, sub_value in value.get_params(deep=True).items():
                    out[f"{name}__{sub}"] = sub_value
            out[name] = value
        return out

    def set_params(self, **params: Any) -> ParamsMixin:
        """Set hyperparameters by name (``name__sub`` reaches into an estimator-valued one);
        returns ``self``. Raises ``ValueError`` naming the valid parameters if a name is not
        one, before anything is set. Values are checked when ``fit`` runs, as in
        scikit-learn."""
        if not params:
            return self
        valid = self._get_param_names()
        nested: dict[str, dict[str, Any]] = {}
        direct: dict[str, Any] = {}
        for key, value in params.items():
            name, sep, sub = key.partition("__")
            if name not in valid:
                raise ValueError(
                    f"invalid parameter {name!r} for {type(self).__name__}; "
                    f"valid parameters: {', '.join(valid)}"
                )
            if sep:
                owner = params.get(name, getattr(self, name))
                if not hasattr(owner, "set_params"):
                    raise ValueError(
                        f"parameter {name!r} of {type(self).__name__} is not an estimator, "
                        f"so {key!r} cannot be set"
                    )
                nested.setdefault(name, {})[sub] = value
            else:
                direct[name] = value
        for name, value in direct.items():
            setattr(self, name, value)
        for name, sub_params in nested.items():
            getattr(self, name).set_params(**sub_params)
        return self

    def __sklearn_tags__(self) -> Any:
        """scikit-learn (>= 1.6) estimator tags: no target required, NaN allowed where the
        estimator reads it as missing. Model selection (``GridSearchCV``, ``cross_val_score``)
        reads them; scikit-learn is imported only here, when it asks."""
        from sklearn.utils import InputTags, Tags, TargetTags, TransformerTags

        return Tags(
            estimator_type=None,
            target_tags=TargetTags(required=False),
            transformer_tags=TransformerTags() if hasattr(self, "transform") else None,
            input_tags=InputTags(allow_nan=self._allows_nan),
        )

    def __repr__(self) -> str:
        try:
            shown = [
                f"{p.name}={getattr(self, p.name)!r}"
                for p in _init_parameters(type(self))
                if p.default is inspect.Parameter.empty
                or not _same(getattr(self, p.name), p.default)
            ]
        except AttributeError:  # a subclass that does not store an argument
            return object.__repr__(self)
        return f"{type(self).__name__}({', '.join(shown)})"


class FitTransformMixin:
    """``fit_transform(X)`` = ``fit(X).transform(X)`` for an estimator with both."""

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        """Fit to ``X``, then return ``transform(X)``."""
        return self.fit(X, y).transform(X)

"""Runs' parameters: the recipe class of each decoder name, the parameters a run records (and a
resume compares), and the recipe rebuilt from them."""
from __future__ import annotations

import dataclasses
from numbers import Integral

from .file_format import file_params
from .flow_recipe import FlowOrLinearRecipe, FlowRecipe
from .recipe import LinearRecipe, Recipe, ResidualRecipe

__all__ = ["RECIPES", "recipe_for", "resolve_decoder", "training_parameters",
           "recipe_from_parameters", "ADDED_PARAMETER_DEFAULTS", "NON_TRAINING_PARAMETERS"]


# The recipe class of each decoder name; "flow_or_linear" is what decoder="auto" means with u.
RECIPES = {"linear": LinearRecipe, "mlp": Recipe, "residual": ResidualRecipe, "flow": FlowRecipe,
           "flow_or_linear": FlowOrLinearRecipe}


def recipe_for(decoder: str) -> type:
    """The recipe class of a decoder name (see :data:`RECIPES`)."""
    try:
        return RECIPES[decoder]
    except KeyError:
        raise ValueError(f"decoder must be one of {sorted(RECIPES)}, got {decoder!r}") from None


# Parameters added after files were first written, with the behaviour those files had.
ADDED_PARAMETER_DEFAULTS = {"table_optimizer": "torch", "kl": "mc",
                            "posterior_covariance": "diagonal"}
# Parameters that do not change the training computation: they may differ on resume.
NON_TRAINING_PARAMETERS = ("verbose", "checkpoint_path", "checkpoint_every", "device",
                           "transform_max_iter", "n_threads", "tol")


def resolve_decoder(decoder: str, with_u: bool) -> str:
    """The decoder a fit uses: ``decoder="auto"`` is "flow_or_linear" (the invertible flow
    against the linear flow, chosen on held-out rows: :class:`FlowOrLinearRecipe`) when the rows
    come with segment labels u (the setting where a nonlinear mix is identifiable, and the
    flow's exact likelihood separates it), else "linear"; any other name is itself."""
    if decoder != "auto":
        return decoder
    return "flow_or_linear" if with_u else "linear"


def training_parameters(params: dict, decoder: str) -> dict:
    """The parameters that shape the training computation (``params``: an estimator's
    ``get_params()``), as files hold them and with "auto" resolved for ``decoder`` (see
    :func:`resolve_decoder`): what a run records and a resume compares."""
    p = file_params(params)
    for name in NON_TRAINING_PARAMETERS:
        p.pop(name)
    p["decoder"] = decoder
    cls = recipe_for(decoder)
    if p["max_iter"] == "auto":
        p["max_iter"] = cls.auto_max_iter
    if p["n_restarts"] == "auto":
        p["n_restarts"] = cls.auto_restarts
    return p


def recipe_from_parameters(params: dict, n_components: int, n_groups: int) -> Recipe:
    """The recipe of a run from its training parameters (``RunState.params``, which files
    written before some parameters existed may lack: those take ADDED_PARAMETER_DEFAULTS)."""
    cls = recipe_for(params["decoder"])
    names = {f.name for f in dataclasses.fields(cls)} - {"n_components", "n_groups"}
    values = {k: params.get(k, ADDED_PARAMETER_DEFAULTS.get(k)) for k in names}
    hidden = values["hidden"]
    values["hidden"] = (hidden,) if isinstance(hidden, Integral) else tuple(hidden)
    if isinstance(values["noise"], list):
        values["noise"] = tuple(values["noise"])
    return cls(n_components=int(n_components), n_groups=n_groups, **values)

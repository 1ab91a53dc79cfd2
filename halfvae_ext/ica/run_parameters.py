"""Runs' parameters: the recipe class of each decoder name, the parameters a run records (and a
resume compares), and the recipe rebuilt from them."""
from __future__ import annotations

import dataclasses
from numbers import Integral

from .em_recipe import EM_SETTINGS, LinearEMRecipe
from .file_format import file_params
from .flow_recipe import FlowOrLinearRecipe, FlowRecipe
from .param_validation import InvalidParameterError
from .recipe import LinearRecipe, Recipe, ResidualRecipe

__all__ = ["RECIPES", "recipe_for", "resolve_decoder", "training_parameters",
           "recipe_from_parameters", "ADDED_PARAMETER_DEFAULTS", "NON_TRAINING_PARAMETERS"]


# The recipe class of each decoder name; "flow_or_linear" is what decoder="auto" means with u,
# "linear_em" the linear decoder with solver="em".
RECIPES = {"linear": LinearRecipe, "linear_em": LinearEMRecipe, "mlp": Recipe,
           "residual": ResidualRecipe, "flow": FlowRecipe, "flow_or_linear": FlowOrLinearRecipe}


def recipe_for(decoder: str) -> type:
    """The recipe class of a decoder name (see :data:`RECIPES`)."""
    try:
        return RECIPES[decoder]
    except KeyError:
        raise ValueError(f"decoder must be one of {sorted(RECIPES)}, got {decoder!r}") from None


# Parameters added after files were first written, with the behaviour those files had.
ADDED_PARAMETER_DEFAULTS = {"table_optimizer": "torch", "kl": "mc",
                            "posterior_covariance": "diagonal", "solver": "adam"}
# Parameters that do not change the training computation: they may differ on resume.
NON_TRAINING_PARAMETERS = ("verbose", "checkpoint_path", "checkpoint_every", "device",
                           "transform_max_iter", "n_threads", "tol")


def resolve_decoder(decoder: str, with_u: bool, params: dict | None = None,
                    n_rows: int | None = None) -> str:
    """The recipe a fit uses (a key of :data:`RECIPES`). ``decoder="auto"`` is "flow_or_linear"
    (the invertible flow against the linear flow, chosen on held-out rows:
    :class:`FlowOrLinearRecipe`) when the rows come with segment labels u (the setting where a
    nonlinear mix is identifiable, and the flow's exact likelihood separates it), else "linear".
    The linear decoder is "linear_em" (variational EM, :class:`LinearEMRecipe`) with
    ``solver="em"``, and with ``solver="auto"`` unless a setting only the gradient solver
    honours asks otherwise (mini-batches, a fused table optimizer, a full posterior, a noise
    schedule; a batch_size of at least ``n_rows`` is the full batch, and with n_rows None,
    before the data is seen, batch_size is not held against EM). ``params``: the estimator's
    parameters (None: solver "adam"). InvalidParameterError when solver="em" cannot fit these
    settings."""
    if decoder == "auto":
        decoder = "flow_or_linear" if with_u else "linear"
    solver = "adam" if params is None else params.get("solver", "adam")
    if solver == "em" and decoder != "linear":
        raise InvalidParameterError(f"solver='em' fits the linear decoder only, got decoder="
                                    f"{decoder!r} (use solver='auto' or 'adam')")
    if decoder != "linear" or solver == "adam":
        return decoder
    blockers = [name for name, value in EM_SETTINGS.items() if params.get(name, value) != value]
    if "batch_size" in blockers and (n_rows is None or params["batch_size"] >= n_rows):
        blockers.remove("batch_size")
    if isinstance(params.get("noise"), (tuple, list)):
        blockers.append("noise")
    if not blockers:
        return "linear_em"
    if solver == "em":
        raise InvalidParameterError(
            f"solver='em' is full-batch with a diagonal posterior and a learned or fixed noise: "
            f"{', '.join(f'{b}={params[b]!r}' for b in blockers)} need solver='adam'")
    return "linear"


def training_parameters(params: dict, decoder: str) -> dict:
    """The parameters that shape the training computation (``params``: an estimator's
    ``get_params()``), as files hold them and with "auto" resolved for ``decoder`` (see
    :func:`resolve_decoder`): what a run records and a resume compares."""
    p = file_params(params)
    for name in NON_TRAINING_PARAMETERS:
        p.pop(name)
    p["decoder"] = decoder
    p["solver"] = "em" if decoder == "linear_em" else "adam"
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

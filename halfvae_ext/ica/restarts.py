"""Restarts of the recipe, the best kept by final ELBO, as a resumable run.

:class:`RunState` is everything needed to continue a run exactly (which restart and epoch, the
restart seeds, the finished restarts, the best so far with its states, the live restart's states);
``to_dict``/``from_dict`` give the plain structure that the estimator's files hold
(:mod:`.file_format`). :func:`run_restarts` advances a run.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .recipe import LiveRestart, Recipe

__all__ = ["RestartSnapshot", "FinishedRestart", "BestRestart", "RunState", "run_restarts"]


@dataclass
class RestartSnapshot:
    """A restart's states, detached from the live objects: model and optimizer state dicts,
    generator state, per-epoch ELBO so far."""
    model: dict
    optimizers: list
    generator: torch.Tensor
    history: list

    @classmethod
    def of(cls, live: LiveRestart) -> "RestartSnapshot":
        return cls(copy.deepcopy(live.model.state_dict()),
                   [copy.deepcopy(o.state_dict()) for o in live.optimizers],
                   live.generator.get_state(), list(live.history))

    def to_dict(self) -> dict:
        return {"model": self.model, "optimizers": self.optimizers, "generator": self.generator,
                "history": self.history}

    @classmethod
    def from_dict(cls, d: dict) -> "RestartSnapshot":
        return cls(d["model"], list(d["optimizers"]), d["generator"], list(d["history"]))

    def resume(self, recipe: Recipe, Xw: torch.Tensor, device) -> LiveRestart:
        return recipe.restore(self.model, self.optimizers, self.generator, self.history, Xw,
                              device)


@dataclass
class FinishedRestart:
    elbo: float
    n_iter: int
    history: list

    def to_dict(self) -> dict:
        return {"elbo": self.elbo, "n_iter": self.n_iter, "history": self.history}


@dataclass
class BestRestart:
    """The finished restart with the highest final ELBO so far, with its states."""
    restart: int
    elbo: float
    n_iter: int
    snapshot: RestartSnapshot

    def to_dict(self) -> dict:
        return {"restart": self.restart, "elbo": self.elbo, "n_iter": self.n_iter,
                **self.snapshot.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "BestRestart":
        return cls(int(d["restart"]), float(d["elbo"]), int(d["n_iter"]),
                   RestartSnapshot.from_dict(d))


@dataclass
class RunState:
    """A run of len(seeds) restarts. ``params``: the training parameters it was started with;
    ``fingerprint``: of its data (both checked on resume)."""
    params: dict
    fingerprint: str
    seeds: list
    restart: int = 0
    epoch: int = 0
    current: RestartSnapshot | None = None
    finished: list = field(default_factory=list)
    best: BestRestart | None = None
    done: bool = False

    @property
    def n_restarts(self) -> int:
        return len(self.seeds)

    @property
    def diverged(self) -> bool:
        """Done, and every restart ended with a non-finite ELBO: there is no model to keep."""
        return self.done and (self.best is None or not math.isfinite(self.best.elbo))

    def to_dict(self) -> dict:
        return {"params": self.params, "fingerprint": self.fingerprint, "seeds": list(self.seeds),
                "restart": self.restart, "epoch": self.epoch,
                "current": None if self.current is None else self.current.to_dict(),
                "finished": [f.to_dict() for f in self.finished],
                "best": None if self.best is None else self.best.to_dict(), "done": self.done}

    @classmethod
    def from_dict(cls, d: dict) -> "RunState":
        """The run of ``to_dict``'s structure (the file format checks the file around it)."""
        return cls(params=dict(d["params"]), fingerprint=d["fingerprint"],
                   seeds=[int(s) for s in d["seeds"]], restart=int(d["restart"]),
                   epoch=int(d["epoch"]),
                   current=None if d["current"] is None
                   else RestartSnapshot.from_dict(d["current"]),
                   finished=[FinishedRestart(float(f["elbo"]), int(f["n_iter"]),
                                             list(f["history"])) for f in d["finished"]],
                   best=None if d["best"] is None else BestRestart.from_dict(d["best"]),
                   done=bool(d["done"]))

    def finish_restart(self, live: LiveRestart, elbo: float) -> None:
        """Record the current restart's final ELBO (-inf if not finite), keep it if it is the
        best so far (ties keep the earlier one), and move on to the next restart."""
        if not math.isfinite(elbo):
            elbo = -math.inf
        self.finished.append(FinishedRestart(elbo, self.epoch, list(live.history)))
        if self.best is None or elbo > self.best.elbo:
            self.best = BestRestart(self.restart, elbo, self.epoch, RestartSnapshot.of(live))
        self.restart += 1
        self.epoch = 0
        self.done = self.restart >= self.n_restarts


def run_restarts(run: RunState, recipe: Recipe, Xw: torch.Tensor, device, *,
                 stop_after: int | None = None,
                 checkpoint: Callable[[RunState], None] | None = None,
                 checkpoint_every: int | None = None,
                 progress: Callable[[RunState, float], None] | None = None,
                 u: torch.Tensor | None = None) -> None:
    """Advance ``run`` on the whitened data Xw until it is done or ``stop_after`` epochs have run.
    u: the segment (0 .. n_groups - 1, int64) of every row of Xw for a conditional prior, or None.

    Each epoch is ``recipe.of_restart(restart).epoch`` (the restart's own recipe); a restart ends
    after ``max_iter`` epochs or once the recipe says it has ``converged``.
    checkpoint(state): called with a consistent state (the live restart
    snapshotted into ``current``) every ``checkpoint_every`` epochs, when a restart ends and when
    the run stops early. progress(run, epoch_elbo) after each epoch. A stopped run keeps its live
    restart in ``run.current``, so that it can continue.
    """
    budget = math.inf if stop_after is None else stop_after
    live = None
    while not run.done:
        this = recipe.of_restart(run.restart)
        if live is None:
            if run.current is not None:
                live = run.current.resume(this, Xw, device)
            else:
                live = this.start(Xw, run.restart, run.seeds[run.restart], device,
                                    *(() if u is None else (u,)))
            run.current = None
        if run.epoch >= this.max_iter or this.converged(live.history):
            # u only when given, so that recipes (and test doubles) without segments are unchanged.
            args = () if u is None else (u,)
            run.finish_restart(live, this.final_elbo(live.model, Xw, run.seeds[run.restart],
                                                       *args))
            live = None
            if checkpoint is not None:
                checkpoint(run)
            continue
        if budget <= 0:
            break
        live.history.append(this.epoch(live.model, live.optimizers, Xw, live.generator,
                                         run.epoch, *(() if u is None else (u,))))
        run.epoch += 1
        budget -= 1
        if progress is not None:
            progress(run, live.history[-1])
        if checkpoint is not None and checkpoint_every and run.epoch % checkpoint_every == 0 \
                and run.epoch < this.max_iter:
            checkpoint(dataclasses.replace(run, current=RestartSnapshot.of(live)))
    if not run.done:
        run.current = RestartSnapshot.of(live)
        if checkpoint is not None:
            checkpoint(run)

"""Stochastic gradient descent without ``torch._dynamo``: the optimiser of bnlib's training loop.

Why it exists: on torch 2.13 (CPU) the first ``torch.optim`` optimiser built in a process
costs about 2.5 s of CPU time, because ``Optimizer.add_param_group`` and ``zero_grad`` are
decorated with ``torch._disable_dynamo`` (which imports ``torch._dynamo`` on its first call)
and ``SGD.step`` is wrapped in a helper that imports it too and calls
``torch._dynamo.graph_break()`` twice per step. Measured on the book's 2-core machine with
``OMP_NUM_THREADS=1``: ``torch.optim.SGD(torch.nn.Linear(4, 4).parameters(), lr=0.1)`` takes
2.1–2.5 s of CPU in a fresh process; :class:`SGD` here takes well under 0.01 s. Every notebook
kernel and every test worker that trains pays that once, for nothing: bnlib never compiles.

:class:`SGD` is a :class:`torch.optim.Optimizer` (so ``isinstance`` checks, ``param_groups``,
``state``, step hooks, learning-rate schedulers and :func:`bnlib.distributed.averaging` work
as usual) with its own ``add_param_group``, ``zero_grad`` and ``step``, none of which touches
dynamo. ``state_dict`` / ``load_state_dict`` are torch's (they import dynamo; they are rare)
and move between this class and ``torch.optim.SGD`` in both directions: the momentum buffer
lives in ``state[p]["momentum_buffer"]`` and every param group carries torch's keys.

The update is the documented one (for each parameter ``p`` with gradient ``g``)::

    g = -g                                  if maximize
    g = g + weight_decay · p                if weight_decay ≠ 0
    buf = g (a copy)                        on the first step, if momentum ≠ 0
    buf = momentum · buf + (1 − dampening) · g   on later steps
    g = g + momentum · buf   if nesterov,   else   g = buf      (if momentum ≠ 0)
    p = p − lr · g

computed with ``torch._foreach_*`` ops; the results are bitwise equal to ``torch.optim.SGD``'s
(``tests/test_optim.py`` checks every step in float32). Not implemented (use
``torch.optim.SGD``): a tensor ``lr``, sparse gradients, ``foreach``/``fused``/``differentiable``.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

__all__ = ["SGD"]


class SGD(torch.optim.Optimizer):
    """SGD with optional (Nesterov) momentum, dampening and L2 weight decay; same constructor
    and results as ``torch.optim.SGD``, without importing ``torch._dynamo`` (module docstring).

    ``params`` is an iterable of tensors, of ``(name, tensor)`` pairs or of param-group dicts.
    """

    def __init__(self, params: ParamsT, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False) -> None:
        if isinstance(lr, Tensor):
            raise TypeError("bnlib.optim.SGD takes a float lr, not a Tensor; use torch.optim.SGD")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        # torch.optim.SGD's keys, so that state dicts load in both directions
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=None, differentiable=False,
                        fused=None)
        super().__init__(params, defaults)  # calls our add_param_group

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved by an older torch lack these keys
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters (a dict with ``"params"`` and optional per-group options;
        missing options take the constructor's values). Same checks and errors as torch."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but "
                            "the ordering of tensors in sets will change between runs. "
                            "Please use a list instead.")
        else:
            params = list(params)
        named = [isinstance(p, tuple) for p in params]
        if any(named):
            if not all(named):
                raise ValueError("all optimizer params should be with/without names. "
                                 "Some param names are missing")
            param_group["param_names"] = [name for name, _ in params]
            params = [p for _, p in params]
        param_group["params"] = params
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                                + torch.typename(p))
            if not (p.is_leaf or p.retains_grad):
                raise ValueError("can't optimize a non-leaf Tensor")
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        if len(set(params)) != len(params):
            warnings.warn("optimizer contains a parameter group with duplicate parameters; "
                          "in future, this will cause an error; "
                          "see github.com/pytorch/pytorch/issues/40967 for more information",
                          stacklevel=3)
        seen: set[Tensor] = set()
        for group in self.param_groups:
            seen.update(group["params"])
            if ("param_names" in group) != ("param_names" in param_group):
                which = "with names" if "param_names" in param_group else "without names"
                raise ValueError("all optimizer param groups should be with/without names. "
                                 f"cannot add param group {which} to the optimizer")
        if not seen.isdisjoint(params):
            raise ValueError("some parameters appear in more than one parameter group")
        self.param_groups.append(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (``set_to_none``, the default) or zero it in place."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    p.grad.zero_()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter that has a gradient (others are left alone).
        ``closure`` (optional) recomputes and returns the loss; it runs with gradients on."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                self._update(group)
        return loss

    def _update(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if any(g.is_sparse for g in grads):
            raise RuntimeError("bnlib.optim.SGD does not support sparse gradients; use torch.optim.SGD")
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        if isinstance(lr, Tensor):
            raise TypeError("bnlib.optim.SGD takes a float lr, not a Tensor; use torch.optim.SGD")
        if group["maximize"]:
            grads = torch._foreach_neg(grads)
        if wd != 0:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if momentum != 0:
            bufs: list[Tensor] = []
            old_bufs: list[Tensor] = []
            old_grads: list[Tensor] = []
            for p, g in zip(params, grads):
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:                      # first step: the buffer is the gradient
                    buf = torch.clone(g).detach()
                    state["momentum_buffer"] = buf
                else:
                    old_bufs.append(buf)
                    old_grads.append(g)
                bufs.append(buf)
            if old_bufs:
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, old_grads, alpha=1 - group["dampening"])
            if group["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=momentum)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-lr)

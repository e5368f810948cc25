"""The function the engine runs per micro-batch: the method's loss on device-ready inputs,
compiled whole (`torch.compile(fullgraph=True)`: a graph break is an error, not a slow path)
when the run compiles; its backward is compiled by AOTAutograd."""
from __future__ import annotations

import dataclasses

import torch


def device_inputs(loss, channels: int):
    """`loss(model, mb)` with mb's images (and extra views) first turned into model inputs on
    their device (`data.pipeline.model_input`: uint8 -> normalised float32)."""
    from .data.pipeline import model_input

    def fn(model, mb):
        mb = dataclasses.replace(
            mb, x={k: model_input(v, channels) for k, v in mb.x.items()},
            views={k: [model_input(v, channels) for v in vs] for k, vs in mb.views.items()})
        return loss(model, mb)
    return fn


def stacked_logs(loss_fn):
    """loss_fn(model, mb) -> (loss, {name: scalar}) as (loss, names, values [len(names)]).

    A compiled graph must not return a log that is a detached alias of the loss: when a
    micro-batch is the whole global batch a log term is `term.detach() * 1.0`, the graph folds
    the product away, and AOTAutograd then hands back the loss without its gradient (seen in
    the buffer-only phase, whose loss is that one term). Stacking the logs makes them a new
    tensor, never an alias."""
    def step_loss(model, mb):
        loss, logs = loss_fn(model, mb)
        names = tuple(logs)
        vals = torch.stack([torch.as_tensor(v).reshape(()).float() for v in logs.values()]) \
            if logs else None
        return loss, names, (vals.detach() if vals is not None else None)
    return step_loss


def logs_apart(compiled):
    """The inverse of `stacked_logs` around the compiled function: (loss, {name: scalar})."""
    def loss_fn(model, mb):
        loss, names, vals = compiled(model, mb)
        return loss, ({k: vals[i] for i, k in enumerate(names)} if names else {})
    return loss_fn


def step_loss_fn(method, compile: bool, channels: int):
    """(model, mb) -> (loss, logs): the loader's uint8 batches normalised on the device first
    (eager, one elementwise kernel per source), then the method's loss, compiled whole when
    `compile` (static-shape methods only; the run plan checks it)."""
    loss = method.loss
    if compile:
        loss = logs_apart(torch.compile(stacked_logs(method.loss), fullgraph=True, dynamic=False))
    return device_inputs(loss, channels)

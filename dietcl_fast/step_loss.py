"""The function the engine runs per micro-batch: the method's loss on device-ready inputs,
compiled whole (`torch.compile(fullgraph=True)`: a graph break is an error, not a slow path)
when the run compiles; its backward is compiled by AOTAutograd."""
from __future__ import annotations

import contextlib
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
    `compile` (static-shape methods only; resolve checks it)."""
    loss = method.loss
    if compile:
        loss = logs_apart(torch.compile(stacked_logs(method.loss), fullgraph=True, dynamic=False))
    return device_inputs(loss, channels)


class CompileLog:
    """The graphs torch.compile built in this process since the log was made: for each, where
    the run was (`where`: time step, phase, iteration; or evaluation) and its compile seconds,
    from torch._dynamo's per-frame compilation metrics:

    * `frame_seconds`: the whole frame compile at the first call: dynamo's trace, then the
      backend (`backend_seconds`: AOTAutograd's joint forward/backward trace and partition,
      and inductor's forward compile); `dynamo_seconds` = frame - backend;
    * `backward_seconds`: inductor's backward compile, which runs at the first backward (0
      when inductor's on-disk cache already held the compiled graph);
    * `seconds`: the two together. `recompile_reason`: the guard that failed when a function
      was compiled again (a new phase shape is one; anything else is a bug to look at);
      `failed`: the error, when the compile did not finish (its seconds: what it took).

    `collect(where)` takes the metrics that appeared since the last call and labels them."""

    def __init__(self):
        self.graphs: list[dict] = []
        self._seen = {self._key(m) for m in self._metrics()}

    @staticmethod
    def _metrics() -> list:
        from torch._dynamo.utils import get_compilation_metrics
        return list(get_compilation_metrics())

    @staticmethod
    def _key(m) -> tuple:
        return (m.compile_id, m.co_name, m.is_forward, m.start_time_us)

    def collect(self, where: dict) -> list[dict]:
        """The graphs first seen since the last call (their backward compile is added to the
        graph it belongs to, whenever it appears), labelled `where`."""
        new = []
        for m in self._metrics():
            k = self._key(m)
            if k in self._seen:
                continue
            self._seen.add(k)
            if m.co_name:                   # a frame: dynamo + AOTAutograd + forward compile
                frame = float(m.entire_frame_compile_time_s or 0.0)
                backend = float(m.backend_compile_time_s or 0.0)
                g = {"compile_id": str(m.compile_id), "function": m.co_name, "where": dict(where),
                     "frame_seconds": frame, "backend_seconds": backend,
                     "dynamo_seconds": frame - backend, "backward_seconds": 0.0,
                     "seconds": frame, "graph_ops": m.graph_op_count,
                     "recompile_reason": m.recompile_reason,
                     "failed": f"{m.fail_type}: {m.fail_reason}" if m.fail_type else None}
                self.graphs.append(g)
                new.append(g)
            elif m.duration_us:             # the lazy backward compile of a graph seen before
                for g in reversed(self.graphs):
                    if g["compile_id"] == str(m.compile_id):
                        g["backward_seconds"] += m.duration_us / 1e6
                        g["seconds"] = g["frame_seconds"] + g["backward_seconds"]
                        break
        return new

    @property
    def seconds(self) -> float:
        return sum(g["seconds"] for g in self.graphs)

    def describe(self, g: dict) -> str:
        w = g["where"]
        at = ", ".join(f"{k} {v}" for k, v in w.items())
        return (f"torch.compile built graph {g['compile_id']} ({g['function']}, {g['graph_ops']} "
                f"ops) at {at}: {g['frame_seconds']:.1f} s (dynamo {g['dynamo_seconds']:.1f} s)"
                + (f" + backward {g['backward_seconds']:.1f} s" if g["backward_seconds"] else ""))


# ----------------------------------------------- tracing the step without its device (fake tensors)
FAKE_MICRO_BATCH_FIELDS = ("x", "y", "noise", "mix", "seen", "step", "step_classes", "views")


def map_tensors(obj, fn):
    """`fn` applied to every tensor nested in dicts, lists and dataclasses (as in a
    micro-batch: its images, labels, MixDraw, ClassSet); everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [map_tensors(v, fn) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: map_tensors(getattr(obj, f.name), fn)
                            for f in dataclasses.fields(obj)})
    return obj


def fake_tensors(obj, mode, device: str):
    """Host tensors (nested as in a micro-batch) -> fake tensors of FakeTensorMode `mode` on
    `device` (shapes and dtypes only: a step can be traced in its CUDA form on a machine
    without a GPU)."""
    return map_tensors(obj, lambda t: mode.from_tensor(t).to(device))


def fake_micro_batch(mb, mode, device: str, to=None):
    """A micro-batch with its tensors faked on `device` (`fake_tensors`; `to`: instead, this
    function applied to each tensor, e.g. a move to the meta device) and no generators."""
    fn = to or (lambda t: mode.from_tensor(t).to(device))
    return dataclasses.replace(mb, generator=None, mask_generator=None,
                               **{f: map_tensors(getattr(mb, f), fn)
                                  for f in FAKE_MICRO_BATCH_FIELDS})


@contextlib.contextmanager
def bf16_autocast(device: str):
    """bf16 autocast on `device`, also for fake CUDA tensors on a machine without a GPU:
    torch.autocast asks the CUDA runtime whether it may switch on; once on, the CUDA autocast
    rules apply."""
    if device == "cpu":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
        return
    saved = torch.cuda.is_available, torch.cuda.is_bf16_supported
    torch.cuda.is_available = lambda: True
    torch.cuda.is_bf16_supported = lambda *a, **k: True
    try:
        ac = torch.autocast("cuda", dtype=torch.bfloat16)
    finally:
        torch.cuda.is_available, torch.cuda.is_bf16_supported = saved
    with ac:
        yield

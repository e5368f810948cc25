"""Engines wrap model + optimiser: backward, step, accumulation, autocast, state."""
from .distributed import DistInfo, init_from_env, launched_by, resolve_engine
from .torch_engine import TorchEngine


def build_engine(name: str, model, device, amp_dtype=None, *, dist_info=None, zero_stage: int = 0,
                 micro_batch: int = 1, accum: int = 1, log=None):
    """torch: one process, or gradient all-reduce across ranks (torchrun); deepspeed: ZeRO 0-2.
    `auto` resolves to deepspeed under the deepspeed launcher, else torch. `log` (rank 0's):
    where the engine states its precision and gradient communication, once."""
    dist_info = dist_info or DistInfo()
    name = resolve_engine(name)
    if name == "torch":
        if zero_stage:
            raise ValueError(f"--zero-stage {zero_stage} needs --engine deepspeed (the torch engine "
                             "keeps a full optimiser copy on every rank, i.e. ZeRO-0)")
        return TorchEngine(model, device, amp_dtype, rank=dist_info.rank,
                           world_size=dist_info.world_size,
                           log=log if dist_info.is_main else None)
    if name == "deepspeed":
        from .deepspeed_engine import DeepSpeedEngine
        return DeepSpeedEngine(model, device, amp_dtype, dist_info=dist_info, zero_stage=zero_stage,
                               micro_batch=micro_batch, accum=accum, log=log)
    raise ValueError(f"--engine {name!r} is unknown; choose torch, deepspeed or auto")


__all__ = ["TorchEngine", "build_engine", "DistInfo", "init_from_env", "launched_by",
           "resolve_engine"]

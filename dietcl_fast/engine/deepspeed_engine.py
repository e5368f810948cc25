"""The DeepSpeed engine: ZeRO 0/1/2 data parallelism behind the same seam as the torch engine.

What it does differently from a textbook DeepSpeed loop, and why:

* **A new DeepSpeed engine per phase.** Every phase of every step starts a fresh AdamW
  (docs/algorithm.md, "Optimiser per phase"), and the head grows at each time step (the
  parameter set changes). `build_optimizer` therefore
  destroys the previous engine (removing ZeRO's gradient hooks from the parameters) and calls
  `deepspeed.initialize` again with a fresh `torch.optim.AdamW` over the current parameter
  groups. A torch optimiser (not DeepSpeed's FusedAdam/CPUAdam) avoids compiling an op.
* **Loss scaling.** The methods' losses are normalised by the *global* per-source counts, so the
  sum of one rank's micro-batch losses is that rank's share of the global-batch loss. DeepSpeed
  divides each loss by `gradient_accumulation_steps` (`scale_wrt_gas`, turned off here) and
  averages gradients over data-parallel ranks (we multiply the loss by `world_size` to undo it).
  The gradient at the optimiser step is then the one-process gradient of the global batch.
* **Precision.** Parameters, gradients and optimiser state stay fp32; compute runs in bf16 on
  GPUs (fp32 on the CPU), as in the torch engine, through DeepSpeed's `torch_autocast` section
  (torch.autocast(bf16) with fp32 weights): `forward_backward` runs the loss under it, and so
  does DeepSpeed's own forward (`engine.ds(...)`), which without the section computes in fp32,
  silently (on a GPU it even switches an outer autocast off). DeepSpeed's `bf16` section is not used: it
  keeps bf16 weights with fp32 master copies inside the optimiser, and re-creating the
  optimiser every phase would re-derive the masters from bf16 weights, i.e. round every weight
  to bf16 at every phase boundary. Gradient communication: with `torch_autocast`, ZeRO-1/2
  reduce the gradients of Linear and Conv layers (DeepSpeed's lower-precision-safe modules) in
  bf16 and the rest in fp32; ZeRO-0 all-reduces in `communication_data_type` (fp32). The run's
  log states it when the first optimiser is built (`precision_summary`). Gradient clipping is
  off (as in the reference recipe).
* **LR.** Set per parameter group every iteration from the trainer's cosine x the group's
  layer-decay `lr_scale` (no DeepSpeed scheduler).
* **Checkpoints** go through `save_checkpoint` (ZeRO shards + module) with the trainer's state
  as client state, under a fresh tag; rank 0 then moves the `latest_dietcl` pointer atomically
  and deletes the previous tag, so a kill at any moment leaves one complete checkpoint.
* ZeRO-3 is refused: it partitions the parameters themselves, and growing the head, reading the
  model for evaluation and re-creating the engine each phase would all need gathered-parameter
  contexts; ViT-B/16 (~112 M parameters with the MAE decoder, ~1.8 GB of fp32 weights + AdamW
  state) fits one GPU comfortably, so stage 3 has nothing to offer here.

One known difference from the torch engine: DeepSpeed gives a parameter that no rank used in an
optimiser step a zero gradient (the torch engine leaves it `None`, so AdamW skips it), so
AdamW's decoupled weight decay still shrinks it. In DietCL this is only the MAE decoder during
buffer-only phases (lr x 0.1 x weight decay 0.05 per step: a relative change of ~1e-5 per step
at the paper's LR), and the decoder is not used for predictions.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil

import torch

from dietcl_fast.fsio import FORMAT_VERSION, CheckpointError, atomic_write_bytes, plain_state

DS_MISSING = ("--engine deepspeed needs DeepSpeed, which is not installed in this environment "
              "({err}). Install the extra: pip install 'dietcl-fast[deepspeed]' "
              "(or pip install deepspeed), or use --engine torch (which also runs under torchrun).")

POINTER = "latest_dietcl"       # our atomic pointer (DeepSpeed's own `latest` is not atomic)
DS_SUBDIR = "deepspeed"
SHM_DIR = "/dev/shm"
_shm_released = False           # once per process: DeepSpeed sets its shm all-reduce up once


def shm_buffer_prefix() -> str:
    """The start of every path of this user's DeepSpeed CPU all-reduce buffers (its `shm` op):
    the POSIX shared-memory names its shm.cpp builds from the user id, then MASTER_ADDR,
    MASTER_PORT and the rank."""
    return os.path.join(SHM_DIR, f"deepspeed_allreduce_buffer_{os.getuid()}_")


def shm_buffer_path(rank: int) -> str:
    """Where this job's rank `rank` keeps its 69 MB all-reduce buffer."""
    return (f"{shm_buffer_prefix()}{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def release_shm_buffer(rank: int, world_size: int, device: torch.device, log) -> bool:
    """Remove this rank's name of DeepSpeed's shared all-reduce buffer once every rank has mapped
    every buffer -> whether a name was removed. DeepSpeed (0.19) creates one per rank when the
    job's ranks all run on one machine on the CPU (LOCAL_SIZE = WORLD_SIZE) and never unlinks
    it: every such run left 69 MB per rank in /dev/shm, memory, until the machine restarted (140
    files, 9 GB, on the machine that runs the test suite). Its ranks map each other's buffers
    while DeepSpeed starts, so after a barrier the names can go; the memory stays mapped until
    the processes exit, killed or not. Called after the first `deepspeed.initialize` of the
    process; a buffer expected but not found is said in the log (another DeepSpeed naming)."""
    global _shm_released
    if _shm_released or device.type != "cpu":
        return False
    _shm_released = True
    if os.environ.get("LOCAL_SIZE") != str(world_size):
        return False                # DeepSpeed's shm op is off: ranks on several machines
    if world_size > 1:
        torch.distributed.barrier()  # every rank has opened every rank's buffer
    path = shm_buffer_path(rank)
    try:
        os.unlink(path)
    except FileNotFoundError:
        log(f"note: DeepSpeed's shared-memory all-reduce buffer {path} was not found (another "
            "DeepSpeed naming?): if files named deepspeed_allreduce_buffer_* stay in "
            f"{SHM_DIR} after runs, remove them")
        return False
    return True


def import_deepspeed():
    """Import DeepSpeed or stop with a message saying how to install it."""
    try:
        import deepspeed
    except Exception as e:    # ImportError, or a broken install failing at import
        raise ValueError(DS_MISSING.format(err=f"{type(e).__name__}: {e}")) from None
    return deepspeed


def check_resume_world_size(state: dict | None, world_size: int) -> None:
    """The engine state a resume restores (checkpoint.engine_state_to_restore; None: none) on
    `world_size` ranks: ZeRO-1/2 optimiser state is sharded over the ranks that wrote it and
    resumes only on as many -> ValueError naming both world sizes. Checked before anything is
    built (checkpoint.check_resumable) and again when the engine loads the state."""
    if not state or state.get("kind") != "deepspeed":
        return
    old_w, stage = int(state["world_size"]), int(state["zero_stage"])
    if old_w != world_size and stage > 0:
        raise ValueError(
            f"cannot resume: the checkpoint stopped mid-phase with ZeRO-{stage} optimiser state "
            f"sharded over {old_w} ranks, and this run has {world_size}. Resume on "
            f"{old_w} processes (or let the run reach a phase boundary: checkpoints at time-step "
            f"ends hold no optimiser state and resume on any world size).")


class DeepSpeedEngine:
    name = "deepspeed"
    saves_checkpoints = True        # the trainer hands checkpoints to `save_checkpoint`

    def __init__(self, model: torch.nn.Module, device: torch.device, amp_dtype=None, *,
                 dist_info, zero_stage: int = 0, micro_batch: int = 1, accum: int = 1,
                 log=None):
        if zero_stage not in (0, 1, 2):
            raise ValueError(f"--zero-stage {zero_stage}: the deepspeed engine supports ZeRO 0, 1 "
                             "and 2 (stage 3 partitions the parameters, which the growing head and "
                             "the per-phase optimiser rebuild do not support; ViT-B/16 fits one "
                             "GPU with stage 2)")
        self.deepspeed = import_deepspeed()
        self.model = model.to(device)
        self.device = device
        self.amp_dtype = amp_dtype
        self.dist = dist_info
        self.rank, self.world_size = dist_info.rank, dist_info.world_size
        self.zero_stage = zero_stage
        self.micro_batch, self.accum = micro_batch, accum
        self.ds = None              # the current deepspeed.DeepSpeedEngine
        self.optimizer = None
        self._lr_scales: list[float] = []
        self._micro = 0             # micro-batches since the last optimiser step
        self.log = log if (log is not None and dist_info.is_main) else (lambda m: None)
        self._told = False
        # --tensorboard: DeepSpeed's own monitor writes its events under <monitor_dir>/deepspeed
        # (set by the trainer; None: off)
        self.monitor_dir = None

    # ---------------------------------------------------------------- config
    def ds_config(self) -> dict:
        cfg = {
            "train_batch_size": self.micro_batch * self.accum * self.world_size,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accum,
            "zero_optimization": {"stage": self.zero_stage},
            "gradient_clipping": 0.0,
            "steps_per_print": 10 ** 12,
            "wall_clock_breakdown": False,
            "zero_allow_untested_optimizer": True,
        }
        if self.amp_dtype is not None:      # DeepSpeed's forward computes as forward_backward
            cfg["torch_autocast"] = {"enabled": True, "dtype": str(self.amp_dtype).replace("torch.", "")}
        if self.monitor_dir:                # a fresh engine per phase: its sample count restarts
            cfg["tensorboard"] = {"enabled": True, "output_path": self.monitor_dir,
                                  "job_name": "deepspeed"}
        return cfg

    def grad_comm_dtypes(self) -> dict[str, int]:
        """How DeepSpeed reduces the gradients of the current engine: dtype -> number of
        trainable parameters whose gradient is reduced in it."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.zero_stage == 0:            # one all-reduce of every gradient
            return {str(self.ds.communication_data_type).replace("torch.", ""): len(params)}
        from deepspeed.runtime.torch_autocast import get_comm_dtype, is_autocast_initialized
        out: dict[str, int] = {}
        for p in params:        # ZeRO-1/2: per parameter (torch_autocast marks safe modules)
            dt = get_comm_dtype(p) if is_autocast_initialized() else self.ds.communication_data_type
            key = str(dt).replace("torch.", "")
            out[key] = out.get(key, 0) + 1
        return out

    def precision_summary(self) -> str:
        compute = (f"compute {str(self.amp_dtype).replace('torch.', '')} (DeepSpeed torch_autocast)"
                   if self.amp_dtype is not None else "compute fp32")
        comm = ", ".join(f"{n} parameters in {dt}" for dt, n in sorted(self.grad_comm_dtypes().items()))
        return (f"deepspeed engine: ZeRO-{self.zero_stage}, {compute}; weights, gradients and "
                f"AdamW state fp32; gradients reduced across ranks: {comm}")

    # ---------------------------------------------------------------- seam
    def build_optimizer(self, param_groups: list[dict], lr: float, betas, weight_decay=None,
                        all_parameters_used: bool = False):
        """A fresh DeepSpeed engine with a fresh AdamW; `all_parameters_used` (the phase's
        declaration, used by the torch engine's DDP) changes nothing here: ZeRO reduces a
        gradient for every parameter whether the loss used it or not."""
        self._destroy()
        for g in param_groups:
            g.setdefault("lr_scale", 1.0)
            g["lr"] = lr * g["lr_scale"]
        self._lr_scales = [g["lr_scale"] for g in param_groups]
        self._micro = 0
        opt = torch.optim.AdamW(param_groups, lr=lr, betas=betas)
        self.ds, self.optimizer, _, _ = self.deepspeed.initialize(
            model=self.model, optimizer=opt, config=self.ds_config(),
            dist_init_required=False)
        release_shm_buffer(self.rank, self.world_size, self.device, self.log)
        if not self._told:          # once per run: the precision, and how gradients travel
            self._told = True
            self.log(self.precision_summary())
        return self.optimizer

    def _destroy(self) -> None:
        if self.ds is not None:
            self.ds.destroy()           # removes ZeRO's gradient hooks from the parameters
            tb = getattr(getattr(self.ds, "monitor", None), "tb_monitor", None)
            if getattr(tb, "summary_writer", None) is not None:
                tb.summary_writer.close()       # its event file is complete; a phase, one file
            self.ds, self.optimizer = None, None

    def set_lr(self, lr: float) -> None:
        for g, s in zip(self.optimizer.param_groups, self._lr_scales):
            g["lr"] = lr * s

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def forward_backward(self, fn, mb, sync: bool = True):
        """loss, logs = fn(model, mb) under autocast, then backward (DeepSpeed decides when to
        reduce: at the accumulation boundary)."""
        with self.autocast():
            loss, logs = fn(self.model, mb)
        self.backward(loss)
        return loss, logs

    def backward(self, loss: torch.Tensor) -> None:
        # see the module docstring: undo DeepSpeed's /gas and its mean over ranks
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)
        self.ds.step()              # DeepSpeed steps only at the accumulation boundary
        self._micro += 1

    def step(self) -> None:
        # the optimiser already stepped inside the last micro-batch's ds.step()
        if self._micro != self.accum:
            raise RuntimeError(f"deepspeed engine: optimiser step after {self._micro} of "
                               f"{self.accum} micro-batches on rank {self.rank}")
        self._micro = 0

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"kind": "deepspeed", "world_size": self.world_size, "zero_stage": self.zero_stage}

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimiser mid-phase from the DeepSpeed checkpoint the state points to."""
        if state.get("kind") != "deepspeed":
            raise ValueError("this checkpoint was written by the torch engine; resume it with "
                             "--engine torch (the run's saved config)")
        check_resume_world_size(state, self.world_size)
        if self.ds is None:
            raise RuntimeError("deepspeed engine: load_state_dict before build_optimizer")
        tag_dir = checked_tag_dir(os.path.dirname(state["dir"]), state["tag"])
        # DeepSpeed reads its shards through its checkpoint engine with the full unpickler; route
        # those reads through the checksum check and weights_only=True
        ce = self.ds.checkpoint_engine
        ce.load = lambda path, map_location=None: safe_load_shard(path, tag_dir)
        path, _ = self.ds.load_checkpoint(state["dir"], tag=state["tag"], load_module_strict=True,
                                          load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {state['dir']}/{state['tag']}")

    def save_checkpoint(self, run_dir: str, state: dict) -> str:
        """All ranks call this. Writes <run_dir>/deepspeed/<tag>/ and moves the pointer."""
        if self.ds is None:     # nothing trained yet (e.g. a checkpoint at the first step start)
            self.build_optimizer([{"params": [p for p in self.model.parameters() if p.requires_grad]}],
                                 lr=0.0, betas=(0.9, 0.95))
        save_dir = os.path.join(run_dir, DS_SUBDIR)
        pos = state["position"]
        old = read_pointer(run_dir)
        tag = f"g{pos['gstep']}-t{pos['t']}-p{pos['phase']}-i{pos['it']}-{int(pos['step_started'])}"
        if tag == old:
            tag += "-b"
        client = {k: v for k, v in state.items() if k != "model"}   # DeepSpeed saves the module
        client["format_version"] = FORMAT_VERSION
        client["engine"] = dict(self.state_dict())
        client = plain_state(client, "state")        # plain data only: loads with weights_only=True
        if self.dist.is_main and os.path.isdir(os.path.join(save_dir, tag)):
            shutil.rmtree(os.path.join(save_dir, tag))          # a stale partial write
        self.dist.barrier()
        self.ds.save_checkpoint(save_dir, tag=tag, client_state=client, save_latest=False)
        write_checksums(os.path.join(save_dir, tag), self.rank)    # each rank: its own shards
        self.dist.barrier()
        if self.dist.is_main:       # DeepSpeed's save ends with a barrier: every shard is written
            atomic_write_bytes(os.path.join(save_dir, POINTER), tag.encode())
            if old and old != tag:
                shutil.rmtree(os.path.join(save_dir, old), ignore_errors=True)
        self.dist.barrier()
        return os.path.join(save_dir, tag)


_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SUM_SUFFIX = ".sha256"


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _own_files(tag_dir: str, rank: int) -> list[str]:
    """The .pt files of a tag directory that `rank` wrote: its ZeRO shard(s), and for rank 0
    every file that names no rank (the module states)."""
    own = []
    for name in sorted(os.listdir(tag_dir)):
        if not name.endswith(".pt"):
            continue
        m = re.search(r"(?:^|_)rank_(\d+)_mp_rank", name)
        if (m is not None and int(m.group(1)) == rank) or (m is None and rank == 0):
            own.append(name)
    return own


def write_checksums(tag_dir: str, rank: int) -> None:
    """Each rank writes `<file>.sha256` next to the files it wrote (no shared filesystem needed)."""
    for name in _own_files(tag_dir, rank):
        p = os.path.join(tag_dir, name)
        atomic_write_bytes(p + SUM_SUFFIX, _digest(p).encode())


def checked_tag_dir(run_dir: str, tag: str) -> str:
    """<run_dir>/deepspeed/<tag>, after checking that the tag is a plain name (no separators, no
    '..') and that the directory really lies inside the run directory (no symlink out of it)."""
    pointer = os.path.join(run_dir, DS_SUBDIR, POINTER)
    if not isinstance(tag, str) or not _TAG.fullmatch(tag) or ".." in tag:
        raise CheckpointError(f"DeepSpeed checkpoint pointer {pointer} names {tag!r}, which is not a "
                              "checkpoint tag (a plain name inside the run directory); refusing it")
    base = os.path.realpath(os.path.join(run_dir, DS_SUBDIR))
    d = os.path.realpath(os.path.join(base, tag))
    if os.path.dirname(d) != base or not os.path.isdir(d):
        raise CheckpointError(f"DeepSpeed checkpoint pointer {pointer} names {tag!r}, which is not a "
                              f"directory inside {base}; refusing it")
    return d


# DeepSpeed's ZeRO shards pickle these plain data holders (an enum, a loss-scale record, a
# fragment address); they are allowed when reading DeepSpeed's own shards, nothing else is.
def _deepspeed_safe_globals() -> list:
    out = []
    for mod, name in (("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                      ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                      ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                      ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            import importlib
            out.append(getattr(importlib.import_module(mod), name))
        except Exception:
            pass
    return out


def safe_load_shard(path: str, tag_dir: str):
    """Read one file of a DeepSpeed checkpoint: it must lie in `tag_dir`, match the checksum its
    writer recorded, and load with weights_only=True (nothing in it runs)."""
    import io

    real = os.path.realpath(path)
    if os.path.dirname(real) != tag_dir:
        raise CheckpointError(f"DeepSpeed checkpoint file {path} lies outside {tag_dir}; refusing it")
    sums = path + SUM_SUFFIX
    if not os.path.isfile(sums):
        raise CheckpointError(f"DeepSpeed checkpoint file {path} has no checksum ({sums}); "
                              "refusing to load it")
    with open(sums, encoding="ascii", errors="replace") as f:
        want = f.read().strip()
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != want:
        raise CheckpointError(f"DeepSpeed checkpoint file {path} is corrupt: its SHA-256 does not "
                              f"match {sums} (a truncated copy or a flipped bit)")
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return _load_bytes(io.BytesIO(data), path)


def _load_bytes(buf, path: str):
    import pickle

    try:
        return torch.load(buf, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"DeepSpeed checkpoint file {path} holds objects other than tensors, numbers and "
            f"strings; refusing to unpickle it (it could run code) ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise CheckpointError(f"DeepSpeed checkpoint file {path} is unreadable "
                              f"({type(e).__name__}: {e})") from None


def read_pointer(run_dir: str) -> str | None:
    p = os.path.join(run_dir, DS_SUBDIR, POINTER)
    if not os.path.isfile(p):
        return None
    with open(p, "rb") as f:
        raw = f.read(4096)
    try:
        return raw.decode("utf-8").strip() or None
    except UnicodeDecodeError:
        raise CheckpointError(f"DeepSpeed checkpoint pointer {p} is not text; refusing it") from None


def load_client_state(run_dir: str) -> dict | None:
    """The trainer state of the latest DeepSpeed checkpoint (module weights as `model`), read on
    the CPU without DeepSpeed; None when the run has no DeepSpeed checkpoint."""
    tag = read_pointer(run_dir)
    if tag is None:
        return None
    d = checked_tag_dir(run_dir, tag)
    path = os.path.join(d, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"DeepSpeed checkpoint {d} has no {os.path.basename(path)}")
    st = safe_load_shard(path, d)
    out = {k: st[k] for k in ("config", "stream_fingerprint", "buffer", "ledger", "method",
                              "position", "acc", "A", "wall_seconds", "rng", "format_version",
                              "engine") if k in st}
    for k, v in st.items():         # client keys added by later versions travel too
        if k not in out and k not in _DS_KEYS:
            out[k] = v
    out["model"] = st["module"]
    out["engine"] = {**out.get("engine", {}), "dir": os.path.join(run_dir, DS_SUBDIR), "tag": tag,
                     "world_size": int(st.get("dp_world_size", out.get("engine", {}).get("world_size", 1)))}
    return out


_DS_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes",
            "shared_params", "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd",
            "sparse_tensor_module_names", "skipped_steps", "global_steps", "global_samples",
            "dp_world_size", "mp_world_size", "ds_config", "ds_version", "ds_zero_config"}

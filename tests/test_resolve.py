"""The run resolved (config resolved once, the caller's config untouched), the global batch's
micro-batch arithmetic, the MFU helper, and no kill switch in the package."""
import pytest
import torch

from dietcl_fast.batching import BatchShare, probe_micro_batch
from dietcl_fast.config import Config, ConfigError
from dietcl_fast.mfu import mfu
from dietcl_fast.resolve import resolve

CPU = torch.device("cpu")


def test_resolve_fills_the_presets_values_into_a_copy_and_leaves_the_config_alone():
    cfg = Config()
    before = cfg.to_dict()
    resolved = resolve(cfg, CPU, 1)
    assert cfg.to_dict() == before                      # nothing written back
    assert resolved.cfg is not cfg
    assert (resolved.preset, resolved.global_batch, resolved.micro, resolved.n_micro, resolved.accum) == \
        ("cpu-tiny", 64, 64, 1, 1)
    assert resolved.cfg.model.preset == "cpu-tiny" and resolved.cfg.run.batch_size == 64
    assert resolved.cfg.optim.blr == 4e-3 and resolved.cfg.engine.engine == "torch"
    assert resolved.compile is False and resolved.cfg.engine.compile is False   # CPU default: eager
    assert resolved.amp_dtype is None and resolved.budget == cfg.run.budget
    assert any("global batch 64" in n for n in resolved.notes)


def test_resolve_normalises_only_its_copy():
    cfg = Config()
    cfg.run.budget = 4.0                                # YAML may give a whole number as float
    resolved = resolve(cfg, CPU, 1)
    assert resolved.budget == 4 and isinstance(resolved.cfg.run.budget, int)
    assert isinstance(cfg.run.budget, float)


def test_resolve_splits_the_global_batch_over_processes_and_names_what_does_not_divide():
    cfg = Config()
    cfg.run.batch_size, cfg.engine.micro_batch = 16, 4
    resolved = resolve(cfg, CPU, 2)
    assert (resolved.micro, resolved.n_micro, resolved.accum, resolved.world) == (4, 4, 2, 2)
    with pytest.raises(ConfigError, match=r"--batch-size 16 .* micro-batch 4 x world size 3"):
        resolve(cfg, CPU, 3)
    cfg.engine.micro_batch = "auto"                     # probed later: per-process batch first
    resolved = resolve(cfg, CPU, 2)
    assert resolved.probe_micro and resolved.micro == 8
    small = resolved.with_micro(2)
    assert (small.micro, small.accum, small.probe_micro, small.cfg.engine.micro_batch) == (2, 4, False, 2)
    assert resolved.cfg.engine.micro_batch == 8             # with_micro returns a new resolved
    assert probe_micro_batch(16, 2, lambda m: m <= 3) == 2      # largest divisor of 8 that fits
    with pytest.raises(ConfigError, match="--micro-batch auto"):
        probe_micro_batch(16, 2, lambda m: False)


def test_resolve_refuses_compiling_a_method_with_dynamic_shapes():
    cfg = Config()
    cfg.method.name, cfg.engine.compile = "ewc", True
    with pytest.raises(ConfigError, match="--compile: method ewc"):
        resolve(cfg, CPU, 1)
    cfg.method.name = "nope"
    with pytest.raises(ValueError, match="--method 'nope'"):
        resolve(cfg, CPU, 1)


def test_micro_batch_auto_on_a_small_gpu_is_left_to_the_probe(monkeypatch):
    """On a GPU, `--micro-batch auto` resolves with the whole per-process batch only as the
    probe's first candidate: the memory check before any data is read must not refuse it when a
    smaller micro-batch would fit (a 16 GB card with ViT-B/16 at 1,024 images). A fixed
    micro-batch that surely does not fit is still refused, naming the option."""
    free = {"bytes": int(14e9)}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], int(16e9)))
    gpu = torch.device("cuda", 0)                   # resolve reads only the device's type here
    cfg = Config()
    cfg.engine.micro_batch = "auto"
    resolved = resolve(cfg, gpu, 1)
    assert resolved.preset == "vit-b16" and resolved.probe_micro and resolved.micro == 1024
    assert resolved.amp_dtype == torch.bfloat16 and resolved.compile is True   # the CUDA defaults
    cfg.engine.micro_batch = 1024
    with pytest.raises(ConfigError, match="micro-batch 1024: one micro-batch needs"):
        resolve(cfg, gpu, 1)
    cfg.engine.micro_batch = "auto"
    free["bytes"] = int(5e6)                        # not even one image: refused up front
    with pytest.raises(ConfigError, match="micro-batch 1: one micro-batch needs"):
        resolve(cfg, gpu, 1)


def run_plan(G, micro, world):
    cfg = Config()
    cfg.run.batch_size, cfg.engine.micro_batch = G, micro
    return resolve(cfg, CPU, world)


@pytest.mark.parametrize("G,micro,world", [(16, 4, 1), (16, 4, 2), (16, 2, 4), (12, 3, 2)])
def test_micro_batch_j_holds_draw_items_j_j_plus_M_whatever_the_world_size(G, micro, world):
    run = run_plan(G, micro, world)
    for n in (0, 1, 5, G // 2, G):
        for rank in range(world):
            bp = BatchShare(run, rank)
            shard = list(range(rank, n, world))          # this rank's items of an n-item draw
            for j in bp.my_micro():
                got = shard[bp.split(n, j)]
                assert got == list(range(j, n, bp.n_micro)), (n, rank, j)
                assert len(got) == bp.micro_len(n, j)
        all_j = sorted(j for r in range(world) for j in BatchShare(run, r).my_micro())
        assert all_j == list(range(G // micro))


def test_mfu_is_flops_per_synchronised_second_over_the_measured_peak_of_all_processes(monkeypatch):
    assert mfu(3e12, 2.0, 1.5e12) == pytest.approx(1.0)
    assert mfu(3e12, 2.0, 1.5e12, world_size=2) == pytest.approx(0.5)
    assert mfu(1e12, 0.0, 1e12) is None and mfu(1e12, 1.0, 0.0) is None
    from dietcl_fast import mfu as mfu_module
    from dietcl_fast.mfu import matmul_peak
    monkeypatch.setattr(mfu_module, "_PEAKS", {})       # nothing measured yet in this process
    peak = matmul_peak(CPU, tiny=True)
    assert peak["dtype"] == "float32" and peak["n"] == 256 and peak["flops_per_second"] > 1e6
    # measured once per process (a bench's trainers reuse it) without touching torch's RNG
    state = torch.get_rng_state()
    again = matmul_peak(CPU, tiny=True)
    assert again == peak and again is not peak and torch.equal(torch.get_rng_state(), state)
    # a shorter request reuses the longer measurement; a longer one measures again
    assert peak["seconds"] == 0.2 and matmul_peak(CPU, tiny=True, seconds=0.1) == peak
    longer = matmul_peak(CPU, tiny=True, seconds=0.3)
    assert longer["seconds"] == 0.3 and matmul_peak(CPU, tiny=True) == longer


def test_a_run_measures_the_peak_for_a_tenth_of_its_training_within_bounds():
    from dietcl_fast.mfu import run_peak_seconds
    assert run_peak_seconds(CPU, 0.3) == 0.1                       # the floor
    assert run_peak_seconds(CPU, 2.5) == pytest.approx(0.25)       # a tenth
    assert run_peak_seconds(CPU, 3600.0) == 0.5                    # the CPU's full default
    assert run_peak_seconds(torch.device("cuda"), 3600.0) == 1.0   # a GPU's


def test_no_kill_aid_in_the_package_or_its_options(tmp_path):
    """Kill-and-resume tests kill a real process from the test side (tests/kill.py): the
    package has no test hook, and no option stops a run early."""
    import importlib.util
    assert importlib.util.find_spec("dietcl_fast.testing") is None
    assert not hasattr(Config().run, "stop_after_steps")
    d = Config().to_dict()
    d["run"]["stop_after_steps"] = 5
    with pytest.raises(ConfigError, match="run.stop_after_steps"):
        Config.from_dict(d)
    from conftest import cli
    p = cli("train", "--stop-after-steps", "2", "--out", tmp_path / "r", check=False)
    assert p.returncode == 2 and "--stop-after-steps" in p.stderr


def test_trainer_leaves_the_callers_config_alone():
    from test_trainer import tiny_cfg

    from dietcl_fast.trainer import Trainer
    cfg = tiny_cfg()
    cfg.engine.micro_batch = None
    before = cfg.to_dict()
    tr = Trainer(cfg, log=lambda m: None)
    assert cfg.to_dict() == before
    assert tr.cfg.engine.micro_batch == 16 and tr.cfg.model.preset == "cpu-tiny"
    assert (tr.G, tr.micro, tr.n_micro, tr.accum) == (16, 16, 1, 1)


def test_the_options_are_validated_once_and_before_any_process_starts(monkeypatch):
    """The trainer's options go through config.validate once (in resolve), before the device is
    resolved and before any process group is joined; a bad option never reaches them."""
    import dietcl_fast.resolve as rp
    import dietcl_fast.run_parts as run_parts
    from dietcl_fast.trainer import Trainer
    from test_trainer import tiny_cfg
    events = []
    real_validate, real_init = rp.validate, run_parts.init_from_env
    monkeypatch.setattr(rp, "validate", lambda c: (events.append("validate"), real_validate(c))[1])
    monkeypatch.setattr(run_parts, "init_from_env",
                        lambda *a, **k: (events.append("processes"), real_init(*a, **k))[1])
    Trainer(tiny_cfg(), log=lambda m: None)
    assert events == ["validate", "processes"]
    cfg = Config()
    cfg.run.device, cfg.stream.label_rate = "cuda", 2.0     # bad option and (here) no CUDA
    started = []
    with pytest.raises(ConfigError, match="--label-rate 2.0"):
        resolve(cfg, start=lambda device_type, engine: started.append(device_type))
    assert not started
    cfg.stream.label_rate = 0.05
    if not torch.cuda.is_available():       # --device is resolved before the processes start
        with pytest.raises(ConfigError, match="--device cuda: no CUDA device is visible"):
            resolve(cfg, start=lambda device_type, engine: started.append(device_type))
        assert not started
    cfg.run.device = "cpu"
    seen = []
    resolved = resolve(cfg, start=lambda d, e: (seen.append((d, e)), (CPU, 2))[1])
    assert seen == [("cpu", "torch")] and resolved.world == 2 and resolved.device == CPU


def test_the_micro_batch_probe_treats_library_allocation_failures_as_out_of_memory():
    """cuBLAS/cuDNN report a failed workspace allocation as a plain RuntimeError: the probe
    must try a smaller micro-batch then, and still raise every other error."""
    from dietcl_fast.batching import is_device_oom
    assert is_device_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_device_oom(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                      "`cublasCreate(handle)`"))
    assert is_device_oom(RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"))
    assert not is_device_oom(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_device_oom(ValueError("CUDA out of memory"))      # not a runtime error


def test_vit_b16_on_a_laptop_cpu_is_refused_before_it_can_exhaust_memory(monkeypatch):
    """ViT-B/16 (micro-batches of 256 by default) in fp32 on a 16 GB laptop with 12 GB free:
    the lower bound counts the activations each block keeps for backward (about 46 MB an image
    on the cheaper, MAE path; the old bound counted 2 of the ~14 tensors a block keeps, 14 MB)
    and refuses it, naming the options, instead of letting the kernel kill the process. A
    micro-batch that fits is accepted, and the embedded default (cpu-tiny) passes."""
    import dietcl_fast.resolve as resolve_mod
    from dietcl_fast.models import PRESETS
    monkeypatch.setattr(resolve_mod, "_available_host_memory", lambda: int(12e9))
    cfg = Config()
    cfg.model.preset = "vit-b16"
    with pytest.raises(ConfigError, match=r"--batch-size 1024 with micro-batch 256: one micro-batch "
                                          r"needs at least \d+\.\d GB but the cpu has 12\.0 GB"):
        resolve(cfg, CPU, 1)
    cfg.engine.micro_batch = 64                     # gradient accumulation: 64 x 16
    assert resolve(cfg, CPU, 1).micro == 64
    assert resolve(Config(), CPU, 1).preset == "cpu-tiny"
    per_image, model = resolve_mod.training_bytes_lower_bound(PRESETS["vit-b16"]["spec"], "cpu")
    assert 40e6 < per_image < 60e6 and 1.5e9 < model < 2e9       # fp32: 4 bytes a value
    per_image_gpu, _ = resolve_mod.training_bytes_lower_bound(PRESETS["vit-b16"]["spec"], "cuda")
    assert per_image_gpu < per_image                                # bf16 activations

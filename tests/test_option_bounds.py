"""Every numeric option's range is declared once (`option(num=...)` beside it) and every layer
trusts the check `validate` makes from it. Each option's boundary values go through the library
(`validate`, `validate_pretrain`) and through the command line (`train --check` and
`pretrain --check`, which also resolve the run and build the method or the model, so a layer
that refuses what the declared range accepts fails here), and both must agree with the declaration:
inside the range accepted, outside it refused with an error naming the option and the value,
before anything is read or written."""
import math

import pytest
import yaml
from click.testing import CliRunner

from dietcl_fast.cli.main import main
from dietcl_fast.config import (OPTIONS, ConfigError, Config, PretrainConfig, options,
                                validate, validate_pretrain)

TRAIN = [o for o in options(Config) if o.meta.get("num")]
PRETRAIN = [o for o in options(PretrainConfig) if o.meta.get("num")]
# upper ends that are limits of the machine rather than of the option: resolving the run at
# them stops on the memory check (a clear error naming the batch), not on the range
MEMORY_BOUND = {"run.batch_size", "run.eval_batch_size"}
# the top of the range depends on the preset: --mask-ratio must leave one of its patches visible
PRESET_BOUND = {"model.mask_ratio": "patches of preset"}


def _below(x, integer):
    return x - 1 if integer else math.nextafter(x, -math.inf)


def _above(x, integer):
    return x + 1 if integer else math.nextafter(x, math.inf)


def cases(o):
    """(value, accepted) at each declared end of o's range."""
    b = o.meta["num"]
    integer = b.get("integer", False)
    out = []
    if b.get("lo") is not None:
        lo = b["lo"]
        out += [(lo, False), (_above(lo, integer), True)] if b.get("lo_open") else \
            [(lo, True), (_below(lo, integer), False)]
    if b.get("hi") is not None:
        hi = b["hi"]
        hi = int(hi) if integer else hi
        out += [(hi, False), (_below(hi, integer), True)] if b.get("hi_open") else \
            [(hi, True), (_above(hi, integer), False)]
    out.append((math.nan, False))
    if b.get("optional"):
        out.append((None, True))
    return out


def _set(cfg, path, value):
    *secs, key = path.split(".")
    obj = cfg
    for s in secs:
        obj = getattr(obj, s)
    setattr(obj, key, value)


def _context(path) -> dict:
    """The settings of the run in which path's option is read: its method runs; L2P's pool
    holds top_k."""
    parts = path.split(".")
    out = {"method.name": parts[1]} if parts[0] == "method" and len(parts) == 3 else \
        {"method.name": "gdumb"} if path == "method.memory" else {}
    return {**out, **({"method.l2p.top_k": 1} if path == "method.l2p.pool_size" else {})}


def _context_args(path) -> list:
    """_context on the command line."""
    return [a for p, v in _context(path).items() for a in (OPTIONS[p].flag, str(v))]


def _text(v):
    return repr(v) if isinstance(v, float) else str(v)


@pytest.mark.parametrize("o", TRAIN, ids=[o.path for o in TRAIN])
def test_train_option_bounds_agree_in_the_library_and_on_the_command_line(o, tmp_path):
    for value, accepted in cases(o):
        cfg = Config()
        for p, v in {**_context(o.path), o.path: value}.items():
            _set(cfg, p, v)
        if accepted:
            validate(cfg)
        else:
            with pytest.raises(ConfigError) as e:
                validate(cfg)
            assert (o.flag or o.path) in str(e.value) and _text(value).lower() in \
                str(e.value).lower(), (o.path, value, str(e.value))
        if value is None:
            continue            # the default's "unset": nothing to type on a command line
        # the command line: the flag, or a YAML file for an option of the config file only
        args = ["train", "--check", *_context_args(o.path)]
        if o.flag:
            args += [o.flag, _text(value)]
        else:
            sec, key = o.path.rsplit(".", 1)
            y: dict = {}
            d = y
            for s in sec.split("."):
                d = d.setdefault(s, {})
            d[key] = value
            f = tmp_path / "c.yaml"
            f.write_text(yaml.safe_dump(y))
            args += ["--config", str(f)]
        r = CliRunner().invoke(main, args)
        assert r.exception is None or isinstance(r.exception, SystemExit), (args, r.exception)
        if accepted and o.path in PRESET_BOUND and value > 0.99:
            assert r.exit_code == 2 and PRESET_BOUND[o.path] in r.output and o.path in r.output, \
                (args, r.output)
        elif accepted and not (o.path in MEMORY_BOUND and value == int(o.meta["num"]["hi"])):
            assert r.exit_code == 0, (args, r.output)
        elif accepted:
            assert r.exit_code == 2 and " GB " in r.output and "needs at least" in r.output, \
                (args, r.output)
        else:
            assert r.exit_code == 2, (args, r.output)
            assert (o.flag or o.path) in r.output, (args, r.output)


@pytest.mark.parametrize("o", PRETRAIN, ids=[o.path for o in PRETRAIN])
def test_pretrain_option_bounds_agree_in_the_library_and_on_the_command_line(o, tmp_path):
    for value, accepted in cases(o):
        cfg = PretrainConfig(out=str(tmp_path / "p"))
        _set(cfg, o.path, value)
        if value is None:       # the default's "unset": nothing to type on a command line
            validate_pretrain(cfg)
            continue
        r = CliRunner().invoke(main, ["pretrain", "--check", o.flag, _text(value),
                                      "--out", str(tmp_path / "p")])
        assert r.exception is None or isinstance(r.exception, SystemExit), (o.path, r.exception)
        assert not (tmp_path / "p").exists()            # --check writes nothing
        if accepted:
            validate_pretrain(cfg)
            if f"model.{o.path}" in PRESET_BOUND and value > 0.99:     # the model's own field
                assert r.exit_code == 2 and PRESET_BOUND[f"model.{o.path}"] in r.output and \
                    o.flag in r.output, (o.path, r.output)
            else:
                assert r.exit_code == 0, (o.path, value, r.output)
            continue
        with pytest.raises(ConfigError) as e:
            validate_pretrain(cfg)
        assert o.flag in str(e.value), (o.path, value, str(e.value))
        assert r.exit_code == 2 and o.flag in r.output, (o.path, value, r.output)

"""Click options generated from the config dataclasses (dietcl_fast/config.py, and each method's
`Options` in dietcl_fast/methods/, which the registry adds to the config tree).

Each config field carries its help text, flag, choices and (where it depends on the preset or
the device) a description of its default in its metadata; this module turns them into click
options, so an option's name, type, default and help are written once, in the config.
"""
from __future__ import annotations

from typing import Any

import click

from dietcl_fast.config import Config, Option, options


class WholeNumber(click.ParamType):
    """A whole number that may be written as 500 or 500.0; a fractional value is passed on so
    that the config's checks refuse it naming the option."""
    name = "INTEGER"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        try:
            v = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a whole number", param, ctx)
        return int(v) if v.is_integer() else v


class MicroBatchType(WholeNumber):
    """A whole number (8 or 8.0, as WholeNumber) or the word auto."""
    name = "INTEGER|auto"

    def convert(self, value, param, ctx):
        if value == "auto":
            return value
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            self.fail(f"{value!r}: a whole number or auto", param, ctx)


def param_name(o: Option) -> str:
    """The click parameter name of an option (its flag without dashes, `_` for `-`)."""
    return o.flag.lstrip("-").replace("-", "_")


def click_type(o: Option) -> Any:
    m = o.meta
    if m.get("choices"):
        return click.Choice(list(m["choices"]))
    if m.get("auto"):
        return MicroBatchType()
    if m.get("whole"):
        return WholeNumber()
    if m.get("path") == "file":
        return click.Path(dir_okay=False)
    if m.get("path") == "dir":
        return click.Path(file_okay=False)
    return {int: int, float: float, str: str}.get(o.type, str)


def default_text(o: Option) -> str | None:
    """The default as --help and the README show it (None: nothing to show)."""
    m = o.meta
    if m.get("default_text"):
        return m["default_text"]
    d = o.field.default
    if d is None:
        return None
    if o.type is bool:
        return "on" if d else "off"
    return str(d)


def click_option(o: Option) -> click.Option:
    """One click option for one config field."""
    m = o.meta
    flag = o.flag
    name = param_name(o)
    help_ = m["help"]
    show = m.get("default_text") or True
    if o.type is bool:
        neg = "--no-" + flag[2:]
        return click.Option([f"{flag}/{neg}", name], default=o.field.default, help=help_,
                            hidden=m.get("hidden", False), show_default=show)
    if m.get("required"):
        return click.Option([flag, name], required=True, type=click_type(o), help=help_,
                            hidden=m.get("hidden", False))
    return click.Option([flag, name], default=o.field.default, type=click_type(o), help=help_,
                        hidden=m.get("hidden", False), show_default=show)


def cli_options(cls=Config) -> list[Option]:
    """The options of a config tree that have a command-line flag: for `Config`, --method,
    then the stream, --budget, the other sections in field order and each method's own
    options last; other trees in field order."""
    opts = [o for o in options(cls) if o.flag is not None]
    if cls is not Config:
        return opts
    first = ["method.name", "stream.", "run.budget"]

    def rank(o: Option):
        for i, p in enumerate(first):
            if o.path == p or (p.endswith(".") and o.path.startswith(p)):
                return i
        return len(first) + (1 if o.path.count(".") > 1 else 0)
    return sorted(opts, key=rank)          # stable: field order within a rank


def train_params() -> tuple[list[click.Option], dict[str, str]]:
    """`train`'s config options and their map: click parameter name -> config path."""
    opts = cli_options(Config)
    names = [param_name(o) for o in opts]
    dup = {n for n in names if names.count(n) > 1}
    if dup:                             # two fields under one flag: a config authoring error
        raise RuntimeError(f"config options share a flag: {', '.join(sorted(dup))}")
    return [click_option(o) for o in opts], {param_name(o): o.path for o in opts}

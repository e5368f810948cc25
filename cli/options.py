"""Click options generated from the config dataclasses (dietcl_fast/config.py, and each method's
`Options` in dietcl_fast/methods/, which the registry adds to the config tree).

Each config field carries its help text, flag, choices and (where it depends on the preset or
the device) a description of its default in its metadata; this module turns them into click
options, so an option's name, type, default and help are written once, in the config.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

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
    options last (the method registry is imported for them: it imports torch); other trees in
    field order."""
    if cls is Config:
        import dietcl_fast.methods  # noqa: F401  (registers each method's options)
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


@functools.cache
def train_params() -> tuple[list[click.Option], dict[str, str]]:
    """`train`'s config options and their map: click parameter name -> config path. Made on
    first use (it imports the method registry, and with it torch): by ConfigCommand, when
    train, compare or plan parses its arguments or shows its help."""
    opts = cli_options(Config)
    names = [param_name(o) for o in opts]
    dup = {n for n in names if names.count(n) > 1}
    if dup:                             # two fields under one flag: a config authoring error
        raise RuntimeError(f"config options share a flag: {', '.join(sorted(dup))}")
    return [click_option(o) for o in opts], {param_name(o): o.path for o in opts}


_USAGE_WITHOUT_LATE = "dietcl_fast.usage_without_late_params"


class ConfigCommand(click.Command):
    """A command that takes train's config options, each method's own among them (train,
    compare, plan). The method registry that declares those imports torch, so they are made
    (`late_params()`, placed at index `at` of the command's parameters, None: last) when the
    command first parses its arguments or shows its help, not when `dietcl-fast` starts:
    `dietcl-fast --help` and the commands that take none start without torch.

    only_with: a command that reads them only with one of these words of its own (plan:
    --sweep) parses without them while its command line has none of these words and no word
    that could name one of them (a word starting with "-" that names none of its own
    options: --help included), so that `dietcl-fast plan --labelers 5` needs no torch."""

    def __init__(self, *args, late_params: Callable[[], list[click.Parameter]],
                 at: int | None = None, only_with: tuple[str, ...] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._late, self._at, self._only_with = late_params, at, only_with
        self._parsing_without = False

    def all_params(self) -> list[click.Parameter]:
        """The command's parameters, the late ones made if they are not yet."""
        if self._late is not None:
            late, self._late = self._late, None
            at = len(self.params) if self._at is None else self._at
            self.params = self.params[:at] + late() + self.params[at:]   # a new list
        return self.params

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        if not (self._parsing_without or ctx.meta.get(_USAGE_WITHOUT_LATE)):
            self.all_params()
        return super().get_params(ctx)

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        if self._late is None or self._only_with is None:
            return super().make_context(info_name, args, parent, **extra)
        own = {o for p in self.params for o in (*p.opts, *p.secondary_opts)}
        words = [a.split("=", 1)[0] for a in args if a.startswith("-")]
        self._parsing_without = not any(w in self._only_with or w not in own for w in words)
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as e:
            # a bad value of one of the command's own options (`plan --labelers 0`): the usage
            # line click prints with it shows the late options as "[OPTIONS]" as it shows the
            # others, so it is made without them (no torch for a typo); the mark is on this
            # invocation's context, which only that error's message reads
            if self._parsing_without and e.ctx is not None:
                e.ctx.meta[_USAGE_WITHOUT_LATE] = True
            raise
        finally:
            self._parsing_without = False

"""The option tables of docs/options.md, generated from the config dataclasses.

    python -m dietcl_fast.cli.options_table                         # print the tables
    python -m dietcl_fast.cli.options_table --write docs/options.md # replace them in the file
    python -m dietcl_fast.cli.options_table --check docs/options.md # exit 1 if the file disagrees

The tables sit between the marker lines BEGIN and END below; everything else in the file is
left as it is. A test runs --check on the repository's docs/options.md.
"""
from __future__ import annotations

import sys

import click

from dietcl_fast.cli.options import cli_options, default_text
from dietcl_fast.config import Config, Option, PretrainConfig, options

BEGIN = "<!-- options table: generated from the config (dietcl_fast/config.py, each method's " \
        "Options in dietcl_fast/methods/) by " \
        "`python -m dietcl_fast.cli.options_table --write docs/options.md`; do not edit by hand -->"
END = "<!-- end of options table -->"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(o: Option) -> str:
    d = default_text(o)
    return "—" if d is None else f"`{d}`" if not o.meta.get("default_text") else _cell(d)


def _rows(opts: list[Option], key) -> list[str]:
    rows = []
    for o in opts:
        flag = f"`{o.flag}`" if o.flag else "—"
        if o.flag and o.type is bool:
            flag += f" / `--no-{o.flag[2:]}`"
        if o.meta.get("choices"):
            choice = " (" + " \\| ".join(f"`{c}`" for c in o.meta["choices"]) + ")"
        else:
            choice = ""
        rows.append(f"| {flag} | `{key(o)}` | {_default(o)} | {_cell(o.meta['help'])}{choice} |")
    return rows


def table() -> str:
    """The tables as markdown: `train` (and compare, plan --sweep), then `pretrain`."""
    shown = [o for o in cli_options(Config) if not o.meta.get("hidden")]
    file_only = [o for o in options(Config) if o.flag is None]
    head = ["| flag | config key (YAML) | default | what |", "|---|---|---|---|"]
    lines = ["`train` options (`compare` and `plan --sweep` take the same ones). Each is also a "
             "key of a `--config` YAML file (section.key); the last rows are keys of the file "
             "only. A method's own options are read only when that method runs.", ""]
    lines += head + _rows(shown, lambda o: o.path)
    lines += _rows(file_only, lambda o: o.path)
    lines += ["", "`pretrain` options (fields of `PretrainConfig`; no config file):", ""]
    lines += ["| flag | field | default | what |", head[1]]
    lines += _rows([o for o in cli_options(PretrainConfig) if not o.meta.get("hidden")],
                   lambda o: f"pretrain.{o.path}")
    return "\n".join(lines)


def splice(text: str, tbl: str) -> str:
    """text with the part between the markers replaced by tbl."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError("the file has no single options-table marker pair "
                         f"(add the lines\n{BEGIN}\n{END}\nwhere the table goes)")
    a = text.index(BEGIN) + len(BEGIN)
    b = text.index(END)
    return text[:a] + "\n" + tbl + "\n" + text[b:]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--write", "write", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Replace the table between the markers in this file.")
@click.option("--check", "check", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Exit 1 (printing a diff) if the table in this file differs from the config.")
def main(write, check):
    """Print (or write, or check) the option tables generated from the config."""
    tbl = table()
    if not write and not check:
        click.echo(tbl)
        return
    path = write or check
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        new = splice(text, tbl)
    except ValueError as e:
        click.echo(f"error: {path}: {e}", err=True)
        sys.exit(2)
    if write:
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
        click.echo(f"{path}: options table {'updated' if new != text else 'already current'}",
                   err=True)
        return
    if new != text:
        import difflib
        diff = difflib.unified_diff(text.splitlines(), new.splitlines(), f"{path} (now)",
                                    f"{path} (from the config)", lineterm="", n=0)
        click.echo("\n".join(diff), err=True)
        click.echo(f"error: {path}: the options table disagrees with the config; run "
                   f"python -m dietcl_fast.cli.options_table --write {path}", err=True)
        sys.exit(1)
    click.echo(f"{path}: options table matches the config", err=True)


if __name__ == "__main__":
    main()

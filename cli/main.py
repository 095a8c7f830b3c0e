"""Entry point of ``acl-convert``: a thin shell over :mod:`acl_convert`.

``acl-convert CHECKPOINT --layers conv1`` is ``acl-convert convert CHECKPOINT --layers conv1``:
when the first word is not a subcommand, ``convert`` is implied.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

import acl_convert

_GROUP_OPTIONS = {"--help", "-h", "--version", "--install-completion", "--show-completion"}


class _DefaultConvert(TyperGroup):
    """A group whose default subcommand is ``convert``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["convert", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultConvert,
    name="acl-convert",
    help="Turn the convolutions of a pretrained CNN into Analytic Convolutional Layers (ACLs).\n\n"
    "Run `acl-convert CHECKPOINT --layers NAME` to convert; see each command's --help.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"acl-convert {acl_convert.__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Turn the convolutions of a pretrained CNN into Analytic Convolutional Layers (ACLs)."""


def run() -> None:
    """Console-script entry point."""
    app()

"""Entry point of ``acl-convert``: a thin shell over :mod:`acl_convert`.

``acl-convert CHECKPOINT --layers conv1`` is ``acl-convert convert CHECKPOINT --layers conv1``:
when the first word is not a subcommand, ``convert`` is implied.

Output discipline: tables (the report) go to stdout; progress bars, notes and errors go to
stderr, so ``acl-convert ... > report.txt`` captures only the report. User errors and
``OSError``s print one line and exit 2 (usage) or 1 (everything else); ``--debug`` shows
tracebacks. Python warnings are notes (silenced by ``--quiet``).

Printing: neither console parses rich markup, so a name with brackets in it (``a[/]b``,
``model[v1].pth``) is printed as it is; styles are given as ``Text`` styles, never as markup.
"""

from __future__ import annotations

import functools
import json
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

import acl_convert
from acl_convert.errors import UsageError, UserError, os_error
from acl_convert.io.outputs import written
from acl_convert.memory import keep_freed_memory
from acl_convert.report.terminal import print_report
from acl_convert.settings import check_device

_GROUP_OPTIONS = {"--help", "-h", "--version", "--install-completion", "--show-completion"}

# A pipe has no width; wrapping table cells at rich's default of 80 would split numbers.
out = Console(width=None if sys.stdout.isatty() else 160, markup=False)
err = Console(stderr=True, markup=False)


class _DefaultConvert(TyperGroup):
    """A group whose default subcommand is ``convert``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in _GROUP_OPTIONS:
            args = ["convert", *args]
        return super().parse_args(ctx, args)


class _App(typer.Typer):
    """The application; a Ctrl-C before a command runs (while the arguments are parsed) ends
    with the same line and exit code as one during it, not with a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written", highlight=False)
            raise SystemExit(130) from None


app = _App(
    cls=_DefaultConvert,
    name="acl-convert",
    help="Turn the convolutions of a pretrained CNN into Analytic Convolutional Layers (ACLs).\n\n"
    "Run `acl-convert CHECKPOINT --layers NAME` to convert (the `convert` command is implied); "
    "`acl-convert layers CHECKPOINT` lists what can be converted; "
    "`acl-convert demo` converts a real sample that comes with acl-convert; "
    "`acl-convert evaluate MODEL --data DIR` measures accuracy on labelled images; "
    "`acl-convert finetune ANANN --data DIR --teacher ORIGINAL` distils it back.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
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


def _user_errors(fn):
    """Turn library errors into one line on stderr and an exit code, unless --debug."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug, quiet = kwargs.get("debug", False), kwargs.get("quiet", False)
        before = len(written())
        try:
            with warnings.catch_warnings():
                warnings.showwarning = lambda message, *_, **__: _note(quiet, f"warning: {message}")
                return fn(*args, **kwargs)
        except (UserError, OSError) as exc:
            if debug:
                raise
            if isinstance(exc, OSError):
                exc = os_error(exc, doing="use")
            err.print(
                Text.assemble(("error:", "bold red"), " ", exc.cli_message()),
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            done = [str(p) for p in written()[before:]]
            said = f"complete before it: {', '.join(done)}" if done else "nothing was written"
            err.print(Text(f"interrupted; {said}"), soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


DebugOpt = typer.Option(False, "--debug", help="Show Python tracebacks for errors.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or notes on stderr.")
ForceOpt = typer.Option(False, "--force", "-f", help="Overwrite existing output files.")
TrustOpt = typer.Option(
    False,
    "--trust-pickle",
    help="Allow checkpoints that need full unpickling. This runs code stored in the file: only "
    "for files from a source you trust.",
)
ArchOpt = typer.Option(
    None,
    "--arch",
    help="The network: a torchvision name (resnet50), timm:NAME, or your own code as "
    "path/to/file.py:Factory or package.module:Factory (a callable returning the module; "
    "importing it runs it, so only for code you trust). Default: detected from the checkpoint.",
)
TrustCodeOpt = typer.Option(
    False,
    "--trust-code",
    help="Build a user-code architecture (file.py:Factory) recorded in the AnaNN: importing "
    "it runs it.",
)


def _progress(quiet: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
        transient=False,
    )


def _note(quiet: bool, text: str) -> None:
    """A line on stderr, printed literally (never as rich markup); a library
    :class:`~acl_convert.errors.Note` names settings by their flags."""
    if not quiet:
        err.print(Text(getattr(text, "cli", text)), highlight=False)


@app.command()
@_user_errors
def convert(
    checkpoint: Path = typer.Argument(
        ..., help="Pretrained checkpoint: .pth/.pt/.bin state dict or .safetensors."
    ),
    layers: list[str] = typer.Option(
        ...,
        "--layers",
        "-l",
        help="Layers to convert: module names (conv1, features.0, with or without .weight), shell "
        "globs (layer1.*) or 'all'. Repeat or separate with commas.",
    ),
    families: str = typer.Option(
        ",".join(acl_convert.kernels.PAPER_FAMILIES),
        "--families",
        help="Comma-separated analytic families to try (codes or names).",
    ),
    offset: bool = typer.Option(
        True,
        "--offset/--no-offset",
        help="Give each analytic kernel a learnable constant offset (default). --no-offset gives "
        "the paper's pure ACKs; they reproduce a kernel's sum far worse (see docs/kernels.md).",
    ),
    threshold: float = typer.Option(
        None,
        "--threshold",
        "-t",
        help="A kernel becomes analytic only if its relative residual is at most this. "
        "[default: 0.3]",
    ),
    select: str = typer.Option(
        "best",
        "--select",
        help="best: lowest residual; compact: fewest parameters under the threshold.",
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit's initialisation grid."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="AnaNN checkpoint to write [default: ./<stem>.anann.safetensors].",
    ),
    report: Path = typer.Option(
        None, "--report", help="JSON report to write [default: ./<stem>.report.json]."
    ),
    html: bool = typer.Option(
        True,
        "--html/--no-html",
        help="Write an HTML report (one self-contained page: the tables and, per layer, "
        "pictures of families, residuals, AKPs and kernels) [default: ./<stem>.report.html].",
    ),
    figure_layers: int = typer.Option(
        8,
        "--figure-layers",
        help="How many converted layers get pictures in the HTML report (the first ones; "
        "-1: all). The table lists every layer.",
    ),
    # A str, not a Path: a Path drops the trailing / that asks for a folder.
    mosaic: str = typer.Option(
        None,
        "--mosaic",
        help="Also write each layer's kernel picture (original | fitted | difference) as a PNG: "
        "a file name (NAME.<layer>.png when several layers) or a folder (end it with /).",
    ),
    mosaic_channels: str = typer.Option(
        None,
        "--mosaic-channels",
        help="Output channels the pictures show, e.g. 0,5,9 [default: the first ones].",
    ),
    mosaic_tiles: int = typer.Option(
        64, "--mosaic-tiles", help="At most this many kernels (or RGB channels) per picture."
    ),
    calibration: Path = typer.Option(
        None,
        "--calibration",
        help="Folder of images the network really sees (needs a known architecture). Turns on "
        "fidelity-first conversion: layers are converted in network order, each fitted to "
        "minimise its output error on these images as they arrive through the layers "
        "converted before it, then its gains, offsets, plain kernels and bias are re-solved "
        "together; the AnaNN is compared with the original on them.",
    ),
    calibration_limit: int = typer.Option(
        256, "--calibration-limit", help="Use at most this many calibration images."
    ),
    holdout: int = typer.Option(
        None,
        "--holdout",
        help="Of the calibration images, hold out this many: the conversion does not fit to "
        "them, and its fidelity is measured on them (0: measured on the images fitted to, "
        "optimistic). \\[default: a quarter, at most 64]",
    ),
    fit_to: str = typer.Option(
        None,
        "--fit-to",
        help="What a kernel's fit minimises: 'output' (its output error on the calibration "
        "images) or 'plain' (least squares on the kernel). [default: output with "
        "--calibration, else plain]",
    ),
    threshold_on: str = typer.Option(
        None,
        "--threshold-on",
        help="Which relative residual the threshold and the choice of family use: 'output' or "
        "'plain'. [default: as --fit-to]",
    ),
    joint: bool = typer.Option(
        None,
        "--joint/--no-joint",
        help="With --calibration: refit each layer's AKPs channel by channel under the full "
        "input statistics and re-solve its gains, offsets, plain kernels and bias together. "
        "[default: on with --calibration]",
    ),
    sweeps: int = typer.Option(
        2,
        "--sweeps",
        help="Passes over the input channels when refitting a small layer's AKPs under its "
        "full input statistics (0: none).",
    ),
    reconstruct: int = typer.Option(
        0,
        "--reconstruct",
        help="With --calibration: after the joint re-solve, this many gradient steps on all of "
        "a layer's parameters at once on its exact output error (0: none).",
    ),
    compensate: bool = typer.Option(
        True,
        "--compensate/--no-compensate",
        help="With --calibration: fit each layer to reproduce the original network's output "
        "from the inputs the converted network gives it, undoing earlier layers' errors.",
    ),
    target_compact: float = typer.Option(
        None,
        "--target-compact",
        help="Instead of a threshold: reach this compact factor (0..1) while adding the least "
        "output error (kernels chosen by parameters saved per error added).",
    ),
    max_output_error: float = typer.Option(
        None,
        "--max-output-error",
        help="Instead of a threshold: the largest relative output error to spend (per layer, or "
        "over the model with --budget-scope model), saving as many parameters as possible. "
        "Needs --calibration.",
    ),
    budget_scope: str = typer.Option(
        "layer",
        "--budget-scope",
        help="Apply --target-compact / --max-output-error to each layer or to the model.",
    ),
    tie_channels: bool = typer.Option(
        False,
        "--tie-channels",
        help="One family and one AKP set per output channel, shared by its input channels, "
        "each with its own gain and offset (an RGB triple as one pattern in three strengths).",
    ),
    fold_bias: bool = typer.Option(
        True,
        "--fold-bias/--no-fold-bias",
        help="With --calibration: a conv without bias that feeds only a BatchNorm gets a bias "
        "in the joint re-solve, folded into the BatchNorm's running mean (only BN buffers "
        "change).",
    ),
    arch: str = ArchOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    trust_pickle: bool = TrustOpt,
    debug: bool = DebugOpt,
) -> None:
    """Convert selected convolutions of CHECKPOINT into ACLs; write an AnaNN and a report."""
    from acl_convert.io.outputs import OutputPlan, default_output, sibling
    from acl_convert.pipeline import prepare_checkpoint
    from acl_convert.report.figures import picture_path
    from acl_convert.report.files import write_conversion
    from acl_convert.report.pictures import PictureOptions

    given = dict(
        families=families,
        offset=offset,
        threshold=threshold,
        select=select,
        device=device,
        seed=seed,
        fit_to=fit_to,
        threshold_on=threshold_on,
        joint=joint,
        sweeps=sweeps,
        reconstruct=reconstruct,
        compensate=compensate,
        target_compact=target_compact,
        max_output_error=max_output_error,
        budget_scope=budget_scope,
        tie_channels=tie_channels,
        fold_bias=fold_bias,
        calibration_limit=calibration_limit,
        holdout=holdout,
    )
    plan = OutputPlan(force=force, inputs=[checkpoint])
    output = plan.add(output or default_output(checkpoint, ".anann.safetensors"), "the AnaNN")
    report_path = plan.add(report or sibling(output, ".report.json"), "the report")
    html_path = plan.add(sibling(output, ".report.html"), "the HTML report") if html else None
    pictures = PictureOptions.parse(mosaic_channels, mosaic_tiles, figure_layers)
    job = prepare_checkpoint(
        checkpoint,
        [s for sel in layers for s in _split(sel)],
        arch=arch,
        calibration=calibration,
        trust_pickle=trust_pickle,
        **{k: v for k, v in given.items() if v is not None},
    )
    mosaic_paths = {
        lay.name: plan.add(
            picture_path(mosaic, lay.name, len(job.layers)), f"the picture of {lay.name}"
        )
        for lay in (job.layers if mosaic is not None else [])
    }
    for line in job.notes:
        _note(quiet, line)
    n_kernels = sum(lay.num_kernels for lay in job.layers)
    settings = job.settings
    _note(
        quiet,
        f"fitting {n_kernels:,} kernels of {len(job.layers)} layer(s) to "
        f"{len(settings.families)} families on {check_device(settings.device)}"
        + (
            f", by output error on {settings.calibration_images} images "
            f"({settings.holdout_images} more held out to measure fidelity)"
            if settings.fit_to == "output"
            else ""
        ),
    )
    with _progress(quiet) as bar:
        on_progress, overall = _conversion_progress(bar, job.plan())
        result = job.run(on_progress)
        bar.update(overall, completed=bar.tasks[overall].total or 0, description="fitted")
    for line in result.notes[len(job.notes) :]:
        _note(quiet, line)
    doc = result.report
    if not quiet:  # before the files: writing pictures of many layers takes a while
        print_report(doc, out)
    with _progress(quiet) as bar:
        bar.add_task(f"writing {output} and the rest", total=None)
        written = write_conversion(
            result,
            output,
            report_path,
            pictures=mosaic_paths,
            html=html_path,
            doc=doc,
            options=pictures,
        )
    _note(quiet, "wrote " + ", ".join(str(p) for p in written))


def _conversion_progress(bar: Progress, plan=()):
    """A :data:`acl_convert.pipeline.ProgressFn` drawing one bar over the whole conversion on
    ``bar``, weighted by the plan's estimates (:meth:`acl_convert.pipeline.Job.plan`), with the
    task at hand as its description."""
    budget: dict[str, list[list[float]]] = {}
    for step in plan:  # per name, a queue of [units left, seconds per unit]
        budget.setdefault(step.name, []).append([step.units, step.seconds / max(step.units, 1)])
    overall = bar.add_task("converting", total=sum(s.seconds for s in plan) or None)

    def on_progress(task: str, done: int, total: int) -> None:
        label = task if task.startswith("inputs") else f"fit {task}"
        queue = budget.get(task, [])
        advance, left = 0.0, done
        while queue and left > 0:
            take = min(left, queue[0][0])
            advance += take * queue[0][1]
            queue[0][0] -= take
            left -= take
            if queue[0][0] <= 0:
                queue.pop(0)
        bar.update(overall, advance=advance, description=label)

    return on_progress, overall


@app.command("demo")
@_user_errors
def demo_cmd(
    folder: Path = typer.Argument(
        None,
        help="Folder for the demo's files; made when missing, and nothing in it is replaced "
        "[default: a new ./acl-convert-demo, or acl-convert-demo-2, ...].",
        show_default=False,
    ),
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Convert the real sample that comes with acl-convert (SqueezeNet 1.0's first layer, 288
    ImageNet kernels): AnaNN, report, kernel picture and HTML report in one folder."""
    if not quiet:
        out.print(
            "acl-convert demo: converting the real sample that comes with acl-convert, the "
            "first\nconvolution of SqueezeNet 1.0 (Deep Compression, ImageNet; features.0: "
            "96×3×7×7 = 288\nkernels, tensors only), with the default settings.\n",
            highlight=False,
        )
    with _progress(quiet) as bar:
        result = acl_convert.demo(folder, progress=_conversion_progress(bar)[0])
    if not quiet:
        print_report(result.report, out)
        out.print(Text("\n" + result.summary()), highlight=False)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command("layers")
@_user_errors
def layers_cmd(
    checkpoint: Path = typer.Argument(..., help="Checkpoint to inspect."),
    arch: str = ArchOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    trust_pickle: bool = TrustOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """List the convolutions of CHECKPOINT that can be converted."""
    from acl_convert.io.arch import model_for
    from acl_convert.io.checkpoint import load_checkpoint
    from acl_convert.network.convs import conv_layers, listing

    ckpt = load_checkpoint(checkpoint, trust_pickle=trust_pickle)
    notes = ckpt.notes()
    arch, model = model_for(ckpt.state_dict, arch, notes)
    for line in notes:
        _note(quiet or as_json, line)
    rows = listing(conv_layers(ckpt.state_dict, model))
    if as_json:
        total = sum(r["fit_seconds_estimate"] or 0 for r in rows)
        doc = {"arch": arch, "layers": rows, "fit_seconds_estimate": total}
        typer.echo(json.dumps(doc, indent=1))
        return
    table = Table(
        title=Text(f"{checkpoint.name}: convolutions ({arch or 'architecture unknown'})"),
        title_justify="left",
    )
    for col, just in (
        ("layer", "left"),
        ("shape", "left"),
        ("groups", "right"),
        ("kernels", "right"),
        ("est. fit (CPU)", "right"),
    ):
        table.add_column(col, justify=just)
    for r in rows:
        est = "nothing to fit" if not r["eligible"] else f"{r['fit_seconds_estimate']:.1f} s"
        table.add_row(
            Text(r["name"]),
            "×".join(map(str, r["shape"])),
            "?" if r["groups"] is None else str(r["groups"]),
            f"{r['kernels']:,}",
            est,
            style=None if r["eligible"] else "dim",
        )
    eligible = [r for r in rows if r["eligible"]]
    table.add_section()
    table.add_row(
        f"all ({len(eligible)} of {len(rows)} can be converted)",
        "",
        "",
        f"{sum(r['kernels'] for r in eligible):,}",
        f"{sum(r['fit_seconds_estimate'] for r in eligible):.1f} s",
        style="bold",
    )
    out.print(table)


@app.command()
@_user_errors
def bake(
    anann: Path = typer.Argument(..., help="AnaNN checkpoint (.anann.safetensors)."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Plain state dict to write: .pth/.pt (torch) or .safetensors "
        "[default: ./<stem>.baked.safetensors].",
    ),
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Bake an AnaNN back into plain convolution weights (loads into the original model)."""
    from acl_convert.io.anann import bake_state_dict, read_anann
    from acl_convert.io.checkpoint import save_state_dict
    from acl_convert.io.outputs import OutputPlan, default_output

    output = output or default_output(anann, ".baked.safetensors")
    OutputPlan(force=force, inputs=[anann]).add(output, "the baked state dict")
    state = bake_state_dict(read_anann(anann))
    save_state_dict(output, state)
    _note(quiet, f"wrote {output} ({len(state)} tensors)")


@app.command()
@_user_errors
def export(
    anann: Path = typer.Argument(..., help="AnaNN checkpoint (.anann.safetensors)."),
    fmt: str = typer.Option(
        "csv", "--format", help="csv, jsonl (JSON Lines) or json (with schema and units)."
    ),
    plain: bool = typer.Option(
        False, "--plain", help="Also list the plain kernels, with their weights."
    ),
    output: Path = typer.Option(None, "--output", "-o", help="File to write [default: stdout]."),
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    debug: bool = DebugOpt,
) -> None:
    """Export the per-kernel AKP table of an AnaNN (no refitting), one flat row per kernel."""
    from acl_convert.io.anann import read_anann
    from acl_convert.io.outputs import OutputPlan, write_atomic
    from acl_convert.report import kernel_table

    if fmt not in kernel_table.FORMATS:
        raise UsageError(f"--format must be one of {', '.join(kernel_table.FORMATS)}, got {fmt!r}")
    if output is not None:
        OutputPlan(force=force, inputs=[anann]).add(output, "the table")
    ana = read_anann(anann)
    if output is None:
        kernel_table.write(ana, sys.stdout, fmt, plain=plain)
        return

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            rows[0] = kernel_table.write(ana, f, fmt, plain=plain)

    rows = [0]
    write_atomic(output, write)
    _note(quiet, f"wrote {output} ({rows[0]:,} kernels)")


@app.command()
@_user_errors
def info(
    file: Path = typer.Argument(..., help="A checkpoint or an AnaNN."),
    trust_pickle: bool = TrustOpt,
    debug: bool = DebugOpt,
) -> None:
    """Describe a checkpoint or an AnaNN."""
    from acl_convert.io.anann import is_anann, read_anann

    if is_anann(file):
        h = read_anann(file).header
        out.print(
            Text.assemble(
                (str(file), "bold"),
                f": AnaNN (format version {h.format_version}), made by acl-convert "
                f"{h.tool_version} with torch {h.torch_version}",
            )
        )
        sha = (h.source_sha256 or "?")[:16]
        out.print(
            Text(
                f"source: {h.source_file or '(a model in memory)'} (sha256 {sha}…), "
                f"architecture: {h.arch or 'unknown'}"
            )
        )
        st = h.settings
        families = st.get("families")
        families = ",".join(map(str, families)) if isinstance(families, list) else families
        out.print(
            Text(
                f"settings: families {families}, offset {st.get('offset')}, threshold "
                f"{st.get('threshold')}, select {st.get('select')}, seed {st.get('seed')}"
            )
        )
        table = Table(title="converted layers", title_justify="left")
        for col in ("layer", "shape", "families", "compact factor"):
            table.add_column(col)
        for name, rec in h.layers.items():
            table.add_row(
                Text(name),
                "×".join(map(str, rec.shape)),
                Text(" ".join(f"{c}{n}" for c, n in rec.family_counts.items())),
                f"{rec.compact_factor:.4f}",
            )
        out.print(table)
        return
    from acl_convert.io.arch import detect_arch
    from acl_convert.io.checkpoint import load_checkpoint
    from acl_convert.network.convs import conv_layers, eligible

    ckpt = load_checkpoint(file, trust_pickle=trust_pickle)
    arch = detect_arch(ckpt.state_dict)
    convs = conv_layers(ckpt.state_dict)
    n_params = sum(v.numel() for v in ckpt.state_dict.values())
    out.print(
        Text.assemble(
            (str(file), "bold"),
            f": {ckpt.format} checkpoint, {len(ckpt.state_dict)} tensors, {n_params:,} values, "
            f"sha256 {ckpt.sha256[:16]}…",
        )
    )
    out.print(
        Text(
            f"architecture: {arch or 'not recognised'}; convolutions: {len(convs)}, of which "
            f"{sum(eligible(c) for c in convs)} can be converted "
            "(see `acl-convert layers` for the list)"
        )
    )


@app.command("evaluate")
@_user_errors
def evaluate_cmd(
    model: Path = typer.Argument(
        ...,
        help="Network to evaluate: an AnaNN (.anann.safetensors) or a plain checkpoint.",
    ),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Folder of labelled images: one subfolder per class, a labels.csv, or ImageNet "
        "file names (n01440764_*.JPEG) with a classes TSV. See docs/evaluate.md.",
    ),
    labels: Path = typer.Option(
        None,
        "--labels",
        help="CSV with the columns file,index (file relative to --data) "
        "[default: DIR/labels.csv when present].",
    ),
    classes: Path = typer.Option(
        None,
        "--classes",
        help="TSV with the columns index, wnid, torchvision_name: the class index of each "
        "ImageNet wnid [default: imagenet_classes.tsv in DIR or its parent].",
    ),
    arch: str = typer.Option(
        None,
        "--arch",
        help="The network (a torchvision name, timm:NAME or path/to/file.py:Factory; importing "
        "your own code runs it). Default: recorded in the AnaNN, or detected from the "
        "checkpoint.",
    ),
    compare: Path = typer.Option(
        None,
        "--compare",
        help="Reference network of the same architecture (plain checkpoint or AnaNN), e.g. the "
        "original: adds its accuracy, the top-1 agreement and the logits' relative error.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, not a table."),
    limit: int = typer.Option(
        None, "--limit", help="Evaluate only the first N images (in sorted path order)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    quiet: bool = QuietOpt,
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    debug: bool = DebugOpt,
) -> None:
    """Measure the top-1 and top-5 accuracy of MODEL on a folder of labelled images."""
    from acl_convert.io.labelled import labelled_images
    from acl_convert.train.evaluate import evaluate_files

    notes: list[str] = []
    total = len(labelled_images(data, labels=labels, classes=classes).head(limit))
    with _progress(quiet) as bar:
        task = bar.add_task(f"evaluating {total} images", total=total)
        result = evaluate_files(
            model,
            data,
            compare=compare,
            labels=labels,
            classes=classes,
            arch=arch,
            limit=limit,
            batch_size=batch_size,
            device=device,
            trust_pickle=trust_pickle,
            trust_code=trust_code,
            progress=lambda n: bar.advance(task, n),
            notes=notes,
        )
    for line in notes:
        _note(quiet, line)
    if as_json:
        typer.echo(json.dumps(result, indent=1))
        return
    _print_evaluation(result, model, compare, f"{data.name}, {result['layout']}")


def _load_network(path: Path, arch, trust_pickle: bool, trust_code: bool, quiet: bool):
    from acl_convert.io.network import load_network

    notes: list[str] = []
    network, spec = load_network(
        path, arch=arch, trust_pickle=trust_pickle, trust_code=trust_code, notes=notes
    )
    for line in notes:
        _note(quiet, line)
    return network, spec


def _print_evaluation(result: dict, model_path: Path, compare: Path | None, data: str) -> None:
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    table = Table(title=f"accuracy on {result['images']} images of {data}", title_justify="left")
    columns = ["model", "images", "top-1", "top-5"]
    if compare is not None:
        columns += ["top-1 agreement", "logits rel. error"]
    for col in columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    row = [model_path.name, str(result["images"]), pct(result["top1"]), pct(result["top5"])]
    if compare is not None:
        ref = result["reference"]
        table.add_row(*row, pct(result["agreement"]), f"{result['logits_rel_error']:.3g}")
        table.add_row(
            f"{compare.name} (reference)",
            str(result["images"]),
            pct(ref["top1"]),
            pct(ref["top5"]),
            "",
            "",
        )
    else:
        table.add_row(*row)
    out.print(table)


@app.command("finetune")
@_user_errors
def finetune_cmd(
    anann: Path = typer.Argument(..., metavar="ANANN", help="The AnaNN to fine-tune."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Folder of training images. Distillation (--teacher) needs no labels; "
        "--objective labels reads them as `evaluate` does (see docs/evaluate.md).",
    ),
    teacher: Path = typer.Option(
        None,
        "--teacher",
        help="The original network (plain checkpoint or AnaNN) to distil from.",
    ),
    objective: str = typer.Option(
        "logits",
        "--objective",
        help="logits: match the teacher's class distribution; layers: match each converted "
        "layer's original output (cheaper, trains only the ACLs); labels: cross-entropy.",
    ),
    train: str = typer.Option(
        "akp",
        "--train",
        help="Parameters that learn, comma-separated: akp (AKPs, gains, offsets), plain "
        "(plain kernels of the ACLs), rest (all other layers).",
    ),
    lr_akp: float = typer.Option(
        3e-4,
        "--lr-akp",
        help="Adam learning rate of the AKPs (log-scales, radians), gains and offsets; relative: "
        "about the fraction a step changes a value by.",
    ),
    lr_plain: float = typer.Option(1e-3, "--lr-plain", help="... of the plain kernels."),
    lr_rest: float = typer.Option(1e-4, "--lr-rest", help="... of the rest of the network."),
    epochs: int = typer.Option(1, "--epochs", help="Passes over the images."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    temperature: float = typer.Option(1.0, "--temperature", help="Softening of 'logits'."),
    limit: int = typer.Option(None, "--limit", help="Use only the first N images."),
    labels: Path = typer.Option(None, "--labels", help="Labels CSV for --objective labels."),
    classes: Path = typer.Option(None, "--classes", help="Classes TSV for --objective labels."),
    output: Path = typer.Option(
        None,
        "--output",
        "-o",
        help="Fine-tuned AnaNN, written after every epoch "
        "[default: ./<stem>.ft.anann.safetensors].",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted run from OUTPUT's training state."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the image order."),
    arch: str = ArchOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    trust_pickle: bool = TrustOpt,
    trust_code: bool = TrustCodeOpt,
    debug: bool = DebugOpt,
) -> None:
    """Fine-tune an AnaNN: distil from the original network, or train on labels."""
    import torch

    from acl_convert.io.anann import read_anann
    from acl_convert.io.images import list_images, load_image, preprocessing
    from acl_convert.io.outputs import OutputPlan, default_output
    from acl_convert.train.finetune import FinetuneConfig, finetune, require_state, state_path

    config = FinetuneConfig(
        objective=objective,
        train=tuple(_split(train)),
        lr={"akp": lr_akp, "plain": lr_plain, "rest": lr_rest},
        epochs=epochs,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
    )
    config.check()
    if objective != "labels" and teacher is None:
        raise UsageError(
            f"--objective {objective} distils from the original network; give --teacher "
            "ORIGINAL, or use --objective labels with labelled images"
        )
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}; leave it out for all images")
    dev = check_device(device)
    output = output or default_output(anann, ".ft.anann.safetensors")
    if resume:
        require_state(state_path(output))  # before the networks are loaded
    # Resuming replaces the files of the interrupted run.
    plan = OutputPlan(force=force or resume, inputs=[p for p in (anann, teacher) if p])
    plan.add(output, "the fine-tuned AnaNN")
    plan.add(state_path(output), "the training state")
    header = read_anann(anann).header
    student, arch = _load_network(anann, arch, trust_pickle, trust_code, quiet)
    transform = preprocessing(arch, student)
    if objective == "labels":
        from acl_convert.io.labelled import labelled_images
        from acl_convert.train.evaluate import num_outputs

        dataset = labelled_images(data, labels=labels, classes=classes).head(limit)
        dataset.check_labels(num_outputs(student, load_image(dataset.samples[0].path, transform)))
        samples = [(s.path, s.label) for s in dataset.samples]

        def load(items):
            x = torch.stack([load_image(p, transform) for p, _ in items])
            return x, torch.tensor([y for _, y in items], dtype=torch.int64)

    else:
        samples = list_images(data, limit=limit)

        def load(items):
            return torch.stack([load_image(p, transform) for p in items]), None

    teacher_net = None
    if teacher is not None:
        teacher_net, _ = _load_network(teacher, arch, trust_pickle, trust_code, quiet)
    _note(
        quiet,
        f"fine-tuning {','.join(config.train)} of {anann.name} on {len(samples)} images "
        f"({objective}) for {epochs} epoch(s) on {dev}",
    )
    with _progress(quiet) as bar:
        tasks: dict[int, int] = {}

        def on_step(epoch: int, seen: int, loss: float) -> None:
            if epoch not in tasks:
                tasks[epoch] = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=len(samples))
            bar.update(
                tasks[epoch],
                completed=seen,
                description=f"epoch {epoch + 1}/{epochs} loss {loss:.4g}",
            )

        losses = finetune(
            student,
            samples,
            load,
            config,
            output=output,
            header=header,
            teacher=teacher_net,
            resume=resume,
            device=dev,
            progress=on_step,
        )
    table = Table(title=f"fine-tuning {anann.name} ({objective})", title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("mean loss", justify="right")
    for k, value in enumerate(losses, 1):
        table.add_row(str(k), f"{value:.5g}")
    out.print(table)
    _note(quiet, f"wrote {output} and {state_path(output)}")


@app.command("sweep")
@_user_errors
def sweep_cmd(
    checkpoint: Path = typer.Argument(..., help="Pretrained checkpoint."),
    layers: list[str] = typer.Option(
        ..., "--layers", "-l", help="Layers to convert, as for `convert`."
    ),
    calibration: Path = typer.Option(
        ..., "--calibration", help="Folder of images the network really sees (as `convert`)."
    ),
    targets: str = typer.Option(
        "0.2,0.3,0.4,0.5,0.6", "--targets", help="Compact factors to convert at, comma-separated."
    ),
    data: Path = typer.Option(
        None,
        "--data",
        help="Labelled evaluation images, read as `evaluate` reads them (not the calibration "
        "images): adds top-1 and top-5 against the original's.",
    ),
    labels: Path = typer.Option(None, "--labels", help="Labels CSV of --data (as `evaluate`)."),
    classes: Path = typer.Option(None, "--classes", help="Classes TSV of --data (as `evaluate`)."),
    limit: int = typer.Option(None, "--limit", help="Evaluate only the first N --data images."),
    calibration_limit: int = typer.Option(
        256, "--calibration-limit", help="Use at most this many calibration images."
    ),
    holdout: int = typer.Option(
        None,
        "--holdout",
        help="Calibration images held out to measure every point. \\[default: a quarter, at "
        "most 64]",
    ),
    families: str = typer.Option(
        ",".join(acl_convert.kernels.PAPER_FAMILIES), "--families", help="As for `convert`."
    ),
    budget_scope: str = typer.Option(
        "model",
        "--budget-scope",
        help="model: one budget over all layers (fits made once for all points); layer: each "
        "layer meets the budget (one full conversion per point).",
    ),
    sweeps: int = typer.Option(2, "--sweeps", help="As for `convert`."),
    reconstruct: int = typer.Option(0, "--reconstruct", help="As for `convert`."),
    offset: bool = typer.Option(True, "--offset/--no-offset", help="As for `convert`."),
    fold_bias: bool = typer.Option(True, "--fold-bias/--no-fold-bias", help="As for `convert`."),
    json_path: Path = typer.Option(None, "--json", help="Write the points as JSON here."),
    plot: Path = typer.Option(None, "--plot", help="Write the trade-off plot (PNG) here."),
    html_path: Path = typer.Option(None, "--html", help="Write an HTML page of the sweep here."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(0, "--seed", help="Seed of the fit's initialisation grid."),
    arch: str = ArchOpt,
    force: bool = ForceOpt,
    quiet: bool = QuietOpt,
    trust_pickle: bool = TrustOpt,
    debug: bool = DebugOpt,
) -> None:
    """Convert at several compact factors and measure each on held-out images: pick a budget
    before converting."""
    from acl_convert.io.outputs import OutputPlan
    from acl_convert.report.sweep_page import sweep_table

    try:
        values = [float(t) for t in _split(targets)]
    except ValueError:
        raise UsageError(f"--targets must be comma-separated numbers, got {targets!r}") from None
    plan = OutputPlan(force=force, inputs=[checkpoint])
    outputs = {
        key: plan.add(path, what)
        for key, path, what in (
            ("json", json_path, "the sweep's JSON"),
            ("plot", plot, "the sweep's plot"),
            ("html", html_path, "the sweep's page"),
        )
        if path is not None
    }
    evaluation = None
    if data is not None:
        evaluation = _evaluation_set(data, labels, classes, limit, calibration)
    given = dict(
        families=families,
        budget_scope=budget_scope,
        sweeps=sweeps,
        reconstruct=reconstruct,
        offset=offset,
        fold_bias=fold_bias,
        device=device,
        seed=seed,
        calibration_limit=calibration_limit,
        holdout=holdout,
    )
    result = _run_sweep(
        checkpoint, layers, calibration, evaluation, values, arch, trust_pickle, quiet, given
    )
    doc = result.to_dict()
    header, rows = sweep_table(doc)
    held = doc["points"][0]["fidelity"]
    table = Table(
        title=Text(f"sweep of {len(result.layers)} layer(s), held-out: {held['images']} images"),
        title_justify="left",
    )
    for col in header:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*("-" if v is None else f"{v:.4g}" for v in row))
    out.print(table)
    _write_sweep(doc, outputs, checkpoint.name)
    if outputs:
        _note(quiet, "wrote " + ", ".join(str(p) for p in outputs.values()))


def _evaluation_set(data: Path, labels, classes, limit, calibration: Path):
    """The labelled evaluation batches of ``data``, after checking no image is also a
    calibration image (a point measured on images it fitted to would look better than it is)."""
    from acl_convert.io.images import list_images
    from acl_convert.io.labelled import labelled_images

    dataset = labelled_images(data, labels=labels, classes=classes).head(limit)
    shared = {p.resolve() for p in list_images(calibration)} & {
        s.path.resolve() for s in dataset.samples
    }
    if shared:
        raise UsageError(
            f"{len(shared)} image(s) of --data are also calibration images (e.g. "
            f"{sorted(shared)[0].name}); evaluate on images the conversion does not fit to"
        )
    return dataset


def _run_sweep(checkpoint, layers, calibration, dataset, values, arch, trust_pickle, quiet, given):
    from acl_convert.io.images import preprocessing
    from acl_convert.pipeline import prepare_checkpoint
    from acl_convert.sweep import sweep

    job = prepare_checkpoint(
        checkpoint,
        [s for sel in layers for s in _split(sel)],
        arch=arch,
        calibration=calibration,
        trust_pickle=trust_pickle,
        **given,
    )
    for line in job.notes:
        _note(quiet, line)
    evaluation = None
    if dataset is not None:
        evaluation = list(dataset.batches(preprocessing(job.arch, job.model), 32))

    def on_point(target: float, i: int, total: int) -> None:
        _note(quiet, f"[{i + 1}/{total}] converting at compact factor {target:g}")

    return sweep(job, values, evaluation=evaluation, progress=on_point)


def _write_sweep(doc: dict, outputs: dict, name: str) -> None:
    """The sweep's files, renamed together (all new or none, as a conversion's)."""
    from acl_convert.io.outputs import atomic_paths
    from acl_convert.report.figures import to_png
    from acl_convert.report.sweep_page import sweep_figure, sweep_html

    png = to_png(sweep_figure(doc, name)) if {"plot", "html"} & set(outputs) else None
    with atomic_paths(list(outputs.values())) as tmps:
        tmp = dict(zip(outputs, tmps, strict=True))
        if "json" in tmp:
            tmp["json"].write_text(json.dumps(doc, indent=1))
        if "plot" in tmp:
            tmp["plot"].write_bytes(png)
        if "html" in tmp:
            text = sweep_html(doc, png, f"{name}: compact factor against fidelity")
            tmp["html"].write_text(text, encoding="utf-8")


def run() -> None:
    """Console-script entry point."""
    keep_freed_memory()  # this process is ours: reuse freed memory instead of re-faulting it
    app()


if __name__ == "__main__":
    run()

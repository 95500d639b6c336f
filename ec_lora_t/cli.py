"""The `ec-lora-t` command line. Each command only parses its options and calls one library function.

Errors: a command that fails prints one line, `error: <what and why>`, and exits with status 1;
a bad command line (an option that does not parse, a number out of its range, options that do
not go together) exits with status 2, before anything is loaded. `ec-lora-t --debug <command>`
(or EC_LORA_T_DEBUG=1) shows the traceback instead. The console script is `main`, which also
folds click's usage errors into one line. Every numeric option is checked where it is parsed
(`_number`). Help texts avoid square brackets: typer renders help as Rich markup, which
swallows a `[default: ...]` written by hand. Default paths
(the adapter, the base model, the normalisation statistics) are read from the repository this
package was installed from, or the one above the current folder, never from the current folder.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

app = typer.Typer(
    help="EC-LoRA-T: engagement- and time-conditioned LoRA for Stable Diffusion.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
DEBUG_ENV = "EC_LORA_T_DEBUG"
# Defaults inside the repository (params.yaml's model.pretrained and the stages' outputs).
DEFAULT_PRETRAINED = "models/ec-lora-t-base"
DEFAULT_ADAPTER = "data/train/adapter"
DEFAULT_STATS = "data/features/normalization.json"
_debug = {"on": os.environ.get(DEBUG_ENV, "") not in ("", "0")}
Result = TypeVar("Result")
# click's exception base, as typer raises it (recent typer vendors click: not `click.ClickException`).
_CLICK_EXCEPTION = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
_USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "UsageError")


def _number(minimum: float, maximum: float | None = None, above: bool = False) -> Callable[[Any], Any]:
    """A parse-time check for a numeric option (one value or a repeated option's list): finite and
    in range, else a usage error (one line, exit status 2) before anything is loaded. `above`:
    the minimum itself is excluded. click's own ranges let NaN through (every comparison is false)."""
    wanted = f"in [{minimum:g}, {maximum:g}]" if maximum is not None else f"{'>' if above else '>='} {minimum:g}"

    def check(values: Any) -> Any:
        for value in values if isinstance(values, list) else [values]:
            if value is None:
                continue
            if not (math.isfinite(value) and (value > minimum or (value == minimum and not above))
                    and (maximum is None or value <= maximum)):
                raise typer.BadParameter(f"must be a finite number {wanted}, got {value}")
        return values

    return check


def _signal_values(values: list[str]) -> list[str]:
    """Parse-time check of `--signals` ("name=value,name=value" each), a usage error before anything
    is loaded."""
    from ec_lora_t.data.normalizer import parse_signal_values

    for value in values:
        try:
            parse_signal_values(value)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return values


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the traceback, not one line.")] = False,
) -> None:
    _debug["on"] = debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _interval(interval: tuple[float, float]) -> tuple[float, float]:
    """A parse-time check of --vector-guidance-interval: 0 <= START < END <= 1 (exit status 2)."""
    start, end = interval
    if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start < end <= 1.0):
        raise typer.BadParameter(f"must be START END with 0 <= START < END <= 1, got {start:g} {end:g}")
    return interval


def _run(function: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
    """Call the command's library function; an error becomes one line on stderr and exit status 1."""
    try:
        return function(*args, **kwargs)
    except Exception as error:
        if _debug["on"]:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        typer.echo(f"error: {message} (--debug shows the traceback)", err=True)
        raise typer.Exit(1) from None


def repository_root() -> Path | None:
    """The ec-lora-t repository: the one this package lives in (an editable install), else the
    nearest folder above the current one that holds dvc.yaml and params.yaml."""
    package_parent = Path(__file__).resolve().parent.parent
    for folder in (package_parent, *[Path.cwd().resolve(), *Path.cwd().resolve().parents]):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return None


def _in_repository(relative: str, option: str) -> Path:
    """A default path, read from the repository root rather than the current folder."""
    root = repository_root()
    if root is None:
        raise ValueError(f"{option} not given and no ec-lora-t repository found (none holds this package or "
                         f"the current folder) to read the default {relative} from; give {option}")
    return root / relative


@app.command("demo-data")
def demo_data(
    out: Annotated[Path | None, typer.Option(help="Folder to write <shortcode>/img_XX.jpg + metadata.csv into "
                                                  "(default: data/demo_posts in the repository).")] = None,
    num_posts: Annotated[int, typer.Option(help="Number of posts (carousels add images).", callback=_number(1))] = 200,
    image_size: Annotated[int, typer.Option(help="Side of the square images, px.", callback=_number(8))] = 64,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same feed.", callback=_number(0))] = 7,
) -> None:
    """Write the deterministic synthetic creator feed in the report's layout."""
    from ec_lora_t.demo.demo_data import write_demo_posts

    out = out or _run(_in_repository, "data/demo_posts", "--out")
    summary = _run(write_demo_posts, out, num_posts=num_posts, image_size=image_size, seed=seed)
    typer.echo(f"wrote {summary['posts']} posts ({summary['images']} images) to {out}")


@app.command("build-tiny-base")
def build_tiny_base(
    out: Annotated[Path, typer.Option(help="Folder to save the model in diffusers layout.")],
    seed: Annotated[int, typer.Option(help="Weight initialisation seed.", callback=_number(0))] = 0,
    resolution: Annotated[int, typer.Option(help="Image resolution the model is built for, px.",
                                            callback=_number(8))] = 32,
    fp16: Annotated[bool, typer.Option(help="Save the weights in fp16 (half the size).")] = False,
) -> None:
    """Build a tiny Stable Diffusion with random weights from configs (for tests and smoke runs)."""
    import torch

    from ec_lora_t.demo.tiny_model import build_tiny_stable_diffusion

    save_dtype = torch.float16 if fp16 else torch.float32
    typer.echo(f"saved to {_run(build_tiny_stable_diffusion, out, seed=seed, resolution=resolution, save_dtype=save_dtype)}")


@app.command("pretrain-base")
def pretrain_base(
    out: Annotated[Path | None, typer.Option(help="Folder for the model (replaced) in diffusers layout "
                                                  "(default: models/ec-lora-t-base in the repository).")] = None,
    steps: Annotated[int, typer.Option(help="UNet + text encoder steps.", callback=_number(0))] = 3140,
    vae_steps: Annotated[int, typer.Option(help="VAE steps, before the UNet phase.", callback=_number(0))] = 2000,
    batch_size: Annotated[int, typer.Option(help="Images per step.", callback=_number(1))] = 256,
    resolution: Annotated[int, typer.Option(help="Image side, px.", callback=_number(8))] = 32,
    num_images: Annotated[int, typer.Option(help="Size of the rendered general sample of the demo world.",
                                            callback=_number(1))] = 60000,
    learning_rate: Annotated[float, typer.Option(help="UNet and text encoder learning rate.",
                                                 callback=_number(0, above=True))] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed of the sample and the weights.", callback=_number(0))] = 0,
    device: Annotated[str, typer.Option(help="cuda (meant for a GPU) or cpu (smoke runs).")] = "cuda",
    time_limit_s: Annotated[float | None, typer.Option(help="Shorten the UNet phase to end within this time, s.",
                                                       callback=_number(0, above=True))] = None,
) -> None:
    """Pretrain the embedded base model from scratch on the demo world (a GPU run of about 6 minutes)."""
    # No CUDA call before this: pretrain_base renders in forked workers first.
    from ec_lora_t.demo.pretrain import pretrain_base as run_pretraining

    out = out or _run(_in_repository, DEFAULT_PRETRAINED, "--out")
    summary = _run(run_pretraining, out, steps=steps, vae_steps=vae_steps, batch_size=batch_size,
                   resolution=resolution, num_images=num_images, learning_rate=learning_rate, seed=seed,
                   device=device, time_limit_s=time_limit_s)
    typer.echo(f"saved to {out}: {summary.to_json()}")


def _unit_interval(context: typer.Context, parameter: typer.CallbackParam, values: Any) -> Any:
    """Parse-time check of --engagement and --time (the library checks again, for its other callers)."""
    # torch only, not diffusers: a bad value fails fast
    from ec_lora_t.adapter.ecm import check_unit_interval

    for value in values if isinstance(values, list) else [values]:
        try:
            check_unit_interval("the value", value)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return values


def _pair(name_a: str, values_a: list, name_b: str, values_b: list, context: typer.Context | None = None) -> list[tuple]:
    """Pair two repeated options; a single value of the second is used for every first."""
    if len(values_b) == 1:
        values_b = values_b * len(values_a)
    if len(values_a) != len(values_b):
        raise _USAGE_ERROR(f"give one {name_b} or one per {name_a} ({len(values_a)} {name_a}, "
                           f"{len(values_b)} {name_b})", context)
    return list(zip(values_a, values_b))


def _check_vector_options(context: typer.Context, engagement: list, time: list, likes: list, comments: list,
                          date: list, signals: list | None = None) -> None:
    """Options that do not go together are a usage error (exit status 2), never a silent default.

    The context makes `main` add "see `ec-lora-t generate --help`" to the line."""
    normalised, raw = engagement or time, likes or comments or date or signals
    if normalised and raw:
        raise _USAGE_ERROR("give either --engagement with --time, or --likes (with --comments and --date), not both",
                           context)
    if signals:
        if likes or comments:
            raise _USAGE_ERROR("give likes and comments inside --signals (likes=..,comments=..), not beside it", context)
        _pair("--signals", signals, "--date", date or [None], context)
        return
    if engagement and not time:
        # Both are needed: a time the user did not choose (the feed's middle) would be drawn silently.
        raise _USAGE_ERROR("--engagement needs --time (one, or one per --engagement; 0 = the first post, "
                           "1 = the latest)", context)
    if time and not engagement:
        raise _USAGE_ERROR("--time needs --engagement", context)
    if raw and not likes:
        raise _USAGE_ERROR("--comments and --date need --likes", context)
    if not normalised and not raw:
        raise _USAGE_ERROR("give --engagement with --time, or --likes (with --comments and --date)", context)
    _pair("--engagement", engagement, "--time", time, context)
    _pair("--likes", likes, "--comments", comments or [0], context)
    _pair("--likes", likes, "--date", date or [None], context)


def _vectors(engagement: list[float], time: list[float], likes: list[int], comments: list[int], date: list[str],
             stats: Path | None, signals: list[str] = ()) -> tuple[list[tuple[float, float]], list[dict] | None]:
    """The (normalized_engagement, normalized_time) rows asked for, and for raw values what they came from.

    Raw values outside the training range are clipped into [0, 1] with a warning on stderr;
    the PNG metadata records the raw and the clipped values.
    """
    if engagement:
        return [(float(e), float(t)) for e, t in _pair("--engagement", engagement, "--time", time)], None
    from ec_lora_t.data.features import EngagementTimeNormalizer

    normalizer = EngagementTimeNormalizer.from_json(stats or _in_repository(DEFAULT_STATS, "--stats"))
    if signals:
        from ec_lora_t.data.normalizer import parse_signal_values

        dates = [d for _, d in _pair("--signals", signals, "--date", date or [None])]
        queries = [normalizer.query(date=d, signals=parse_signal_values(text)) for text, d in zip(signals, dates)]
    else:
        rows = _pair("--likes", likes, "--comments", comments or [0])
        dates = [d for _, d in _pair("--likes", likes, "--date", date or [None])]
        queries = [normalizer.query(likes=l, comments=c, date=d) for (l, c), d in zip(rows, dates)]
    for query in queries:
        for warning in query.warnings:
            typer.echo(f"warning: {warning}", err=True)
    return [query.vector for query in queries], [query.metadata() for query in queries]


@app.command()
def generate(
    context: typer.Context,
    prompt: Annotated[list[str], typer.Option(help="Prompt; repeat for several.")],
    engagement: Annotated[list[float], typer.Option(help="Normalised engagement in [0, 1]; repeat for several.",
                                                     callback=_unit_interval)] = [],
    time: Annotated[list[float], typer.Option(help="Normalised time in [0, 1]: one, or one per --engagement.",
                                               callback=_unit_interval)] = [],
    likes: Annotated[list[int], typer.Option(help="Raw likes, converted with --stats; repeat for several.",
                                             callback=_number(0))] = [],
    comments: Annotated[list[int], typer.Option(help="Raw comments: one, or one per --likes.",
                                                callback=_number(0))] = [],
    date: Annotated[list[str], typer.Option(help="Post date (ISO, e.g. 2025-06-01): one, or one per --likes.")] = [],
    signals: Annotated[list[str], typer.Option(
        help="Raw signals of one post, for an engagement of other signals than likes and comments "
             "(features.signals, features.per), e.g. saves=40,reach=3000; repeat for several.",
        callback=_signal_values)] = [],
    seed: Annotated[list[int], typer.Option(help="Sampling seed; repeat for several.", callback=_number(0))] = [42],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs.")] = Path("generated"),
    adapter: Annotated[Path | None, typer.Option(help=f"Trained adapter folder (default: {DEFAULT_ADAPTER} in the "
                                                      "repository).")] = None,
    pretrained: Annotated[str | None, typer.Option(help="Base model: hub id or diffusers folder (default: "
                                                        f"{DEFAULT_PRETRAINED} in the repository).")] = None,
    stats: Annotated[Path | None, typer.Option(help="Normalisation statistics of the features stage (default: "
                                                    f"{DEFAULT_STATS} in the repository).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.", callback=_number(1))] = 30,
    sampler: Annotated[str, typer.Option(help="ddim | dpmsolver++ (both deterministic).")] = "ddim",
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.", callback=_number(0))] = 7.5,
    vector_guidance: Annotated[float, typer.Option(
        help="Guidance on the vector away from the average post (1: none beyond the text's; 4: the "
             "evaluate stage's default).", callback=_number(0))] = 4.0,
    vector_scale: Annotated[float, typer.Option(help="Extrapolate the ECM's scales from mid engagement (1: none).",
                                                callback=_number(0))] = 1.0,
    vector_guidance_interval: Annotated[tuple[float, float], typer.Option(
        help="Vector guidance over this fraction of the sampling steps only, START END (0: the first, "
             "noisiest step); outside it two UNet rows per image instead of three.",
        callback=_interval)] = (0.0, 1.0),
    time_guidance: Annotated[float | None, typer.Option(
        help="Time's own guidance scale; --vector-guidance then guides engagement only (default: "
             "--vector-guidance guides both). A vector away from the average post in both costs a "
             "fourth UNet row per image.", callback=_number(0))] = None,
    mode: Annotated[str, typer.Option(help="ec_lora | plain_lora (ECM off) | base (no adapter).")] = "ec_lora",
) -> None:
    """Generate images for every prompt x vector x seed, in one batch; the vector goes into the PNG metadata."""
    _check_vector_options(context, engagement, time, likes, comments, date, signals)
    vectors, raw = _run(_vectors, engagement, time, likes, comments, date, stats, signals)
    # diffusers takes seconds to import: only after the checks above
    from ec_lora_t.generation import VectorSampling
    from ec_lora_t.generation import generate as generate_pngs

    paths = _run(
        generate_pngs,
        pretrained or str(_run(_in_repository, DEFAULT_PRETRAINED, "--pretrained")),
        adapter or _run(_in_repository, DEFAULT_ADAPTER, "--adapter"),
        prompt, vectors, seed, out, num_inference_steps=steps, guidance_scale=guidance_scale, mode=mode,
        sampler=sampler, vector_metadata=raw,
        sampling=VectorSampling(vector_guidance, vector_scale, guidance_interval=vector_guidance_interval,
                                time_guidance=time_guidance),
    )
    typer.echo("\n".join(str(path) for path in paths))


# One line per paragraph: typer's Rich help keeps a docstring's line breaks.
EXPORT_HELP = (
    "Bake the ECM scales for one vector into a plain LoRA file that standard tools load.\n\n"
    "The file is the LoRA with the ECM's scales at this one (engagement, time) multiplied in: loaded into a stock "
    "Stable Diffusion pipeline it draws what `ec-lora-t generate` draws at that vector with --vector-guidance 1.\n\n"
    "It cannot carry vector guidance above 1 (generate's default is 4): that is an extra UNet pass per step, the "
    "same prompt with the adapter at the average post, whose difference from the vector's pass is amplified. No "
    "fixed weights can do that, so the exported LoRA's images differ from generate's default ones."
)


@app.command(help=EXPORT_HELP)
def export(
    engagement: Annotated[float, typer.Option(help="Normalised engagement in [0, 1] to bake in.",
                                               callback=_unit_interval)],
    time: Annotated[float, typer.Option(help="Normalised time in [0, 1] to bake in.", callback=_unit_interval)],
    out: Annotated[Path, typer.Option(help="The .safetensors LoRA file to write.")] = Path("ec_lora_t_export.safetensors"),
    format: Annotated[str, typer.Option(help="diffusers (PEFT keys) | kohya (A1111, ComfyUI).")] = "diffusers",
    adapter: Annotated[Path | None, typer.Option(help=f"Trained adapter folder (default: {DEFAULT_ADAPTER} in the "
                                                      "repository).")] = None,
) -> None:
    """Bake the ECM scales for one vector into a plain LoRA file (the help: EXPORT_HELP)."""
    from ec_lora_t.adapter.export import export_lora

    adapter = adapter or _run(_in_repository, DEFAULT_ADAPTER, "--adapter")
    typer.echo(f"wrote {_run(export_lora, adapter, (engagement, time), out, format=format)}")


def main(argv: list[str] | None = None) -> None:
    """The `ec-lora-t` console script: `app`, with a usage error (an option that does not parse) as one line."""
    try:
        code = app(args=argv, prog_name="ec-lora-t", standalone_mode=False)
    except _CLICK_EXCEPTION as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `ec-lora-t` alone: the help
            typer.echo(error.format_message())
            raise SystemExit(0) from None
        context = getattr(error, "ctx", None)
        hint = f"; see `{context.command_path} --help`" if context is not None else ""
        typer.echo(f"error: {' '.join(error.format_message().split()).rstrip('.')}{hint}", err=True)
        raise SystemExit(error.exit_code) from None
    except typer.Abort:
        typer.echo("aborted", err=True)
        raise SystemExit(1) from None
    raise SystemExit(code if isinstance(code, int) else 0)


@app.command("app")
def slider_app(
    adapter: Annotated[Path, typer.Option(help="Trained adapter folder.")] = DEFAULT_ADAPTER,
    pretrained: Annotated[str, typer.Option(help="Base model: hub id or diffusers folder.")] = DEFAULT_PRETRAINED,
    stats: Annotated[Path, typer.Option(help="Normalisation statistics of the features stage (raw likes and dates).")] = DEFAULT_STATS,
    host: Annotated[str, typer.Option(help="Address to serve on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.", callback=_number(1, 65535))] = 7860,
    steps: Annotated[int, typer.Option(help="Default sampling steps.", callback=_number(1))] = 20,
    guidance_scale: Annotated[float, typer.Option(help="Default classifier-free guidance scale.",
                                                  callback=_number(0))] = 5.0,
) -> None:
    """Open a local web page with engagement and time sliders (needs `pip install -e .[app]`)."""
    try:
        import gradio  # noqa: F401

        from ec_lora_t.app import run_app
    except ImportError as error:
        raise typer.BadParameter(f"the app needs the optional extra: pip install -e '.[app]' ({error})") from None
    run_app(pretrained, adapter, stats, host=host, port=port, steps=steps, guidance_scale=guidance_scale)


if __name__ == "__main__":
    main()

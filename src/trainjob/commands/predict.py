"""``trainjob predict``: the top classes of images, from a run's model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import click

from trainjob.commands import options
from trainjob.errors import DataError
from trainjob.train import predictor

log = logging.getLogger(__name__)


@click.command(name="predict")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@options.env_option("--model", "model_uri", name="model", required=True, metavar="URI",
                    help="A run folder (its model/model.keras and classes.json) or a .keras "
                    "file; local or s3://.")
@options.env_option("--top-k", name="top_k", type=click.IntRange(min=1), default=5,
                    show_default=True, help="How many classes to print per image.")
@options.json_output
@options.from_config("work_dir")
@options.threads
def predict(images: tuple[str, ...], model_uri: str, top_k: int, as_json: bool, work_dir: str,
            threads: int) -> None:
    """Print the most probable classes of each IMAGE: a file, a local folder, an s3:// object
    or an s3:// prefix (its images). Any size or mode; images are resized as in training.

    An image that cannot be read is reported on stderr and the others are still predicted;
    the command then exits 3 (data error). TensorFlow is loaded only here.
    """
    options.logs_to_stderr()

    def report(result: predictor.Prediction) -> None:
        click.echo(f"trainjob: {result.image}: {result.error}", err=True)

    results = predictor.predict(model_uri, list(images), top_k=top_k, work_dir=Path(work_dir),
                                threads=threads, report=report)
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        click.echo(render(results))
    failed = [r for r in results if r.error]
    if failed:
        raise DataError(f"{len(failed)} of {len(results)} images could not be predicted "
                        f"(first: {failed[0].image}: {failed[0].error})")


def render(results: list[predictor.Prediction]) -> str:
    """Each image's name, then its classes with probabilities, one per line."""
    blocks = []
    for r in results:
        if r.error:
            blocks.append(f"{r.image}\n  error: {r.error}")
            continue
        width = max(len(c["class"]) for c in r.top)
        lines = [f"  {c['class'].ljust(width)}  {c['probability']:.4f}" for c in r.top]
        blocks.append("\n".join([r.image, *lines]))
    return "\n\n".join(blocks)

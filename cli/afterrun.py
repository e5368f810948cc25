"""`dietcl-fast predict | export | show`: a run's model and summary after training
(dietcl_fast/afterrun, docs/after-the-run.md)."""
from __future__ import annotations

import json
import sys

import click

_RUN = click.argument("run", metavar="RUN", type=click.Path())
_TIME_STEP = click.option(
    "--time-step", "time_step", default=None, type=click.IntRange(min=0),
    help="Use the model after this time step (latest.pt when the run stopped right after it, "
         "else models/t<t>.pt, kept by train --keep-step-models). Default: the final model.")
_UNFINISHED = click.option(
    "--unfinished", is_flag=True,
    help="Use the latest model of a run that did not finish (refused without it, naming the "
         "last finished time step).")


def _errors():
    from dietcl_fast.afterrun import RunError
    from dietcl_fast.checkpoint import CheckpointError
    from dietcl_fast.config import ConfigError
    return (RunError, CheckpointError, ConfigError, ValueError, FileNotFoundError)


def _interrupted(what: str) -> None:
    click.echo(f"interrupted: {what}", err=True)
    sys.exit(130)


def make_commands(fail) -> list[click.Command]:
    """The three commands; `fail(msg)` prints the error and exits 2 (cli.main._fail)."""

    @click.command(context_settings={"show_default": True})
    @_RUN
    @click.argument("images", nargs=-1, type=click.Path())
    @click.option("--data", default=None,
                  help="Images to classify as a dataset spec (as train's --data: folder:PATH, "
                       "csv:PATH, a named dataset); or give image files / directories as "
                       "arguments after RUN.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False),
                  help="CSV to write: image, label_1, prob_1, ..., label_k, prob_k, and "
                       "true_label when --data has labels.")
    @click.option("--top-k", "top_k", default=5, type=click.IntRange(min=1),
                  help="Classes listed per image (at most the classes the model knows).")
    @_TIME_STEP
    @_UNFINISHED
    @click.option("--batch-size", default=None, type=click.IntRange(min=1),
                  help="Images per forward.  [default: the run's evaluation batch]")
    @click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
                  help="Device (auto: cuda when one is visible).")
    @click.option("--on-bad-image", "on_bad_image", default=None,
                  type=click.Choice(["error", "skip"]),
                  help="A corrupt or missing image stops predict, or is skipped and listed in "
                       "the CSV's error column.  [default: the run's]")
    @click.option("--progress/--no-progress", default=True, help="Show the progress bar.")
    def predict(run, images, data, out, top_k, time_step, unfinished, batch_size, device,
                on_bad_image, progress):
        """Classify images with RUN's model: the top-k classes (the run's class names) and their
        probabilities per image, as a CSV. The images are decoded and transformed as the run's
        evaluation does; a run that did not finish is refused unless --unfinished or
        --time-step says which model.

        \b
        Example:
          dietcl-fast predict runs/dietcl-animal-mnist-... --data folder:/data/new --out preds.csv
          dietcl-fast predict runs/dietcl-animal-mnist-... a.jpg b.png photos/ --out preds.csv
        """
        from dietcl_fast.afterrun import open_run, read_results
        from dietcl_fast.afterrun.predict import predict as run_predict
        log = lambda m: click.echo(m, err=True)     # noqa: E731
        try:
            rm = open_run(run, time_step=time_step, unfinished=unfinished)
            log(f"model: {rm.what}; {len(rm.class_names)} classes")
            s = run_predict(rm, out=out, data=data, images=images, k=top_k,
                            batch_size=batch_size, device=device, on_bad_image=on_bad_image,
                            progress=progress, log=log)
        except _errors() as e:
            fail(str(e))
        except KeyboardInterrupt:
            _interrupted(f"nothing was written to {out}")
        rate = s["images_per_second"]
        log(f"predicted {s['images']} images in {s['seconds']:.2f} s "
            f"({'n/a' if rate is None else f'{rate:.0f}'} images/s on {s['device']}, batch "
            f"{s['batch_size']}; reading and checking the images took {s['prepare_seconds']:.2f} "
            f"s before)" + (f"; {s['skipped']} bad file(s) skipped, listed in the error column"
                            if s["skipped"] else ""))
        res = read_results(run)
        if res and res.get("eval_images") and res.get("eval_seconds"):
            log(f"the run's evaluation: {res['eval_images'] / res['eval_seconds']:.0f} images/s "
                f"on {res['device']['name']} ({res['eval_images']} images)")
        if s["top1_agreement"] is not None:
            log(f"top-1 agrees with the data's labels on {s['top1_agreement']:.2f}% of the "
                f"{s['labeled']} images of classes the model knows")
        log(f"wrote {s['out']}")

    @click.command(context_settings={"show_default": True})
    @_RUN
    @click.option("--out", required=True, type=click.Path(file_okay=False),
                  help="Directory to write model.safetensors and config.json into.")
    @click.option("--with-decoder", is_flag=True,
                  help="Also write the MAE decoder as mae_decoder.safetensors (MAE's names).")
    @_TIME_STEP
    @_UNFINISHED
    def export(run, out, with_decoder, time_step, unfinished):
        """Write RUN's model for other tools: model.safetensors (the encoder and the head of
        the seen classes, as timm's VisionTransformer state dict, strict), config.json (timm's
        pretrained-config layout: architecture, model_args, input size, mean/std, crop, class
        names in head order, and the run's provenance). The export is checked before it is
        written: timm's model loads it strictly and gives the run's logits.

        \b
        Example:
          dietcl-fast export runs/dietcl-animal-mnist-... --out model/
          python -c "import timm; m = timm.create_model('local-dir:model', pretrained=True)"
        """
        from dietcl_fast.afterrun import open_run
        from dietcl_fast.afterrun.export import export as run_export
        log = lambda m: click.echo(m, err=True)     # noqa: E731
        try:
            rm = open_run(run, time_step=time_step, unfinished=unfinished)
            r = run_export(rm, out, with_decoder=with_decoder, log=log)
        except _errors() as e:
            fail(str(e))
        except KeyboardInterrupt:
            _interrupted(f"{out} may hold part of the export")
        log(f"exported {rm.what}: {r['num_classes']} classes, {r['parameters']:,} parameters; "
            f"timm's VisionTransformer loads it strictly, logits within {r['max_logit_diff']:.1e} "
            f"of the run's model")
        for f in r["files"].values():
            log(f"wrote {f}")

    @click.command()
    @_RUN
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    def show(run, as_json):
        """RUN on one screen: stream, method, budget spent, the accuracy matrix with A(T) and
        Ā, throughput, the training log's last record and the files the run holds (a run that
        did not finish: what it has done so far, from its checkpoint).

        \b
        Example:
          dietcl-fast show runs/dietcl-animal-mnist-...
          dietcl-fast show runs/dietcl-animal-mnist-... --json
        """
        from dietcl_fast.afterrun.show import render, summary
        try:
            s = summary(run)
        except _errors() as e:
            fail(str(e))
        click.echo(json.dumps(s, indent=2) if as_json else render(s))

    return [predict, export, show]

"""``calibrate``: fit the learned completion maps of a model on calibration text."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import typer

from .errors import user_errors_exit_2
from .options import DEVICE, MODEL, TRUST, note, quiet_transformers

def register(app: typer.Typer) -> None:
    # Extra arguments are more --text files: `--text a.txt b.txt` (an option takes one value).
    app.command(context_settings={"allow_extra_args": True})(calibrate)


def check_out(out: Path, overwrite: bool) -> None:
    """``--out`` checked before any work: a folder that can be written, without maps unless
    ``overwrite`` (calibration takes minutes; its result must not be lost at the end)."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder: choose another --out")
    if (out / "manifest.json").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds maps: pass --overwrite to replace them, or choose another --out")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise NotADirectoryError(f"--out {out} lies under {existing}, which is a file: choose another --out")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out} cannot be written ({existing} is not writable): choose another --out")


def read_texts(paths: list[Path]) -> list[str]:
    """Plain UTF-8 text files (one text each) or ``.jsonl`` / ``.jsonl.gz`` files (one JSON string
    per line)."""
    texts = []
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"calibration text {path} is a folder: give the text files in it (--text {path}/*.txt)")
        if not path.is_file():
            raise FileNotFoundError(f"calibration text {path} does not exist" if not path.exists() else
                                    f"calibration text {path} is not a regular file")
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                opener = gzip.open if path.name.endswith(".gz") else open
                with opener(path, "rt", encoding="utf-8") as f:
                    for i, line in enumerate(f, 1):
                        if line.strip():
                            value = json.loads(line)
                            if not isinstance(value, str):
                                raise ValueError(f"{path}, line {i}: expected a JSON string per line")
                            texts.append(value)
            else:
                texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, OSError, EOFError) as e:
            raise ValueError(f"cannot read calibration text {path} ({type(e).__name__}): give UTF-8 text or JSON lines") from None
    return [t for t in texts if t.strip()]


@user_errors_exit_2
def calibrate(
    ctx: typer.Context,
    model: str = MODEL,
    text: list[Path] = typer.Option(None, "--text", help="Calibration text: UTF-8 files or .jsonl(.gz) of strings, several after "
                                    "one --text (default for the named models: the embedded model's shipped training-split text). "
                                    "Never use eval text."),
    budget: float = typer.Option(0.01, "--budget", help="The decode budget to calibrate for (b/2 to 4b are sampled)."),
    features: int = typer.Option(64, "--features", min=2, help="Centroids per KV head while fitting (decode may use another count)."),
    directions: int = typer.Option(4, "--directions", min=0, help="Learned query directions per KV head."),
    steps: int = typer.Option(150, "--steps", min=0, help="Optimiser steps per layer."),
    max_tokens: int = typer.Option(16384, "--max-tokens", min=512, help="Each text is cut to this many tokens."),
    out: Path = typer.Option(..., "--out", help="Folder to write maps.safetensors and manifest.json to."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace maps already in --out."),
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Fit the learned completion maps (`--estimator learned`) on the model's own activations."""
    import rcengine

    extra = [Path(a) for a in ctx.args]
    if extra and not text:
        raise ValueError(f"unexpected argument {extra[0]}: calibration texts follow --text (--text a.txt b.txt)")
    text = [*(text or []), *extra]
    check_out(out, overwrite)
    if not text:
        if model is not None and model not in rcengine.NAMED_MODELS:  # named models: the embedded training-split text
            raise ValueError("--text is needed for a model other than the named ones (training text, never eval text)")
        text = [rcengine.default_model_path() / "calibration.jsonl.gz"]
    texts = read_texts(text)
    if not texts:
        raise ValueError("the calibration texts are empty")
    cfg = rcengine.CalibrationConfig(budget=budget, features=features, directions=directions, steps=steps, max_tokens=max_tokens)
    quiet_transformers()
    lm = rcengine.load_model(model, device=device, trust_remote_code=trust_remote_code, log=note)
    maps = rcengine.calibrate(lm, texts, cfg, log=lambda line: typer.echo(line, err=True))
    maps.save(out)
    typer.echo(json.dumps({"maps": str(out), "layers": len(maps.layers), "texts": maps.manifest["texts"],
                           "tokens": maps.manifest["tokens"], "seconds": maps.manifest["seconds"]}))

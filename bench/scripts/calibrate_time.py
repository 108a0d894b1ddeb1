"""How long `rcengine calibrate` takes: the embedded model on this machine's CPU, or the 8B-shaped
random bf16 model on the GPU machine (one command there must stay under 10 minutes).

    python -m rcengine.bench.scripts.calibrate_time [--synthetic 8b] [--steps 150] [--out DIR]

Calibrates on the embedded model's shipped training-split text (11 texts of about 4K tokens),
through the same :func:`rcengine.calibrate` the command runs, and writes
``DIR/calibrate_time.json``: seconds for capture and fitting, tokens, and per layer the final loss
against the centroid map's (tau = gamma = 0) on the calibration queries.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

from ...engine.calibration.fit import CalibrationConfig, calibrate
from ...engine.hf.loader import default_model_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic", choices=["8b"], default=None, help="the 8B-shaped random model (GPU) instead of the embedded one")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"))
    args = parser.parse_args()
    if args.synthetic:
        from .synthetic import SHAPE_8B, random_llama

        lm = random_llama(SHAPE_8B, 32768, "cuda")
    else:
        from ...engine.hf.loader import load_model

        lm = load_model(None)
    with gzip.open(default_model_path() / "calibration.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    t0 = time.perf_counter()
    maps = calibrate(lm, texts, CalibrationConfig(steps=args.steps), log=print)
    if lm.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    per_layer = [{"loss": sum(map(sum, r["loss"])), "centroid_loss": sum(map(sum, r["centroid_loss"])),
                  "log_mass_ratio": r["log_mass_ratio"]} for r in maps.manifest["per_layer"]]
    out = {"date": date.today().isoformat(), "machine": platform.node(), "cpus": os.cpu_count(), "device": str(lm.device),
           "torch": torch.__version__, "model": args.synthetic or "embedded", "steps": args.steps, "texts": maps.manifest["texts"],
           "tokens": maps.manifest["tokens"], "seconds": round(seconds, 1), "per_layer": per_layer}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "calibrate_time.json").write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("model", "device", "texts", "tokens", "seconds")}))


if __name__ == "__main__":
    main()

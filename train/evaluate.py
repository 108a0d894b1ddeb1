"""Evaluate a model on the task suite's eval split with dense attention (stock transformers).

    python train/evaluate.py --model engine/default_model --data .train_data [--lengths 4096,8192,16384,32768] [--n 20]

For each task and length: ``--n`` examples (``--n-single`` for the single-needle tasks at 4K and
16K, the bar the default model must clear), greedy answers of up to 48 tokens, RULER string-match
scores; and bits per byte of held-out text (the eval split, 2048-token windows).  Writes JSON
(default $OUT/eval.json or bench/out/eval.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_model import Data, tasks  # noqa: E402


def answer(model, tok, prompt: str, device: torch.device, max_new: int = 48) -> str:  # noqa: ANN001
    ids = torch.tensor([[tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def bits_per_byte(model, tok, data: Data, device: torch.device, windows: int = 64, seq: int = 2048) -> float:  # noqa: ANN001
    arr = data.tokens["eval"]
    rng = random.Random(0)
    nats, nbytes = 0.0, 0
    for _ in range(windows):
        start = rng.randrange(0, len(arr) - seq - 1)
        ids = torch.tensor(arr[start : start + seq].astype(np.int64), device=device)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        nats += loss.item()
        nbytes += len(tok.decode(arr[start + 1 : start + seq].tolist()).encode())
    return nats / nbytes / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("engine/default_model"))
    parser.add_argument("--data", type=Path, default=Path(".train_data"))
    parser.add_argument("--lengths", default="4096,8192,16384,32768")
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--n-single", type=int, default=50)
    parser.add_argument("--split", default="eval")
    parser.add_argument("--variety", choices=["none", "eval", "heldout"], default="none",
                        help="RULER's one form (none), the eval split's varied phrasings, shapes and sources, or the held-out ones "
                             "(phrasings and a haystack source no training saw; bench/tasks.py)")
    parser.add_argument("--tasks", default=",".join(tasks.TASKS))
    parser.add_argument("--skip-bpb", action="store_true")
    out_dir = Path(os.environ.get("OUT", "bench/out"))
    parser.add_argument("--out", type=Path, default=out_dir / "eval.json")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    data = Data(args.data)
    variety = {"none": None, "eval": tasks.EVAL_VARIETY, "heldout": tasks.HELDOUT_VARIETY}[args.variety]
    gen = data.generator(args.split, variety)
    rows = []
    t0 = time.time()
    for length in [int(x) for x in args.lengths.split(",")]:
        for task in args.tasks.split(","):
            single = task.startswith("niah_single") and length in (4096, 16384)
            n = args.n_single if single else args.n
            scores, depths, cases = [], [], []
            for seed in range(n):
                ex = gen.example(task, length - 64, seed)
                pred = answer(model, tok, ex.prompt, device)
                scores.append(tasks.score(pred, ex.answers, task))
                depths.append(ex.depth)
                cases.append(ex.case)
            rows.append({"task": task, "length": length, "n": n, "accuracy": sum(scores) / n, "scores": scores, "depths": depths,
                         "cases": cases})
            print(f"{length:>6} {task:<20} n={n:<3} accuracy {sum(scores) / n:.3f}  ({time.time() - t0:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"rows": rows}, indent=1))  # partial results survive a time-out
    bpb = None if args.skip_bpb else bits_per_byte(model, tok, data, device)
    print(f"bits per byte on held-out text: {bpb}")
    meta = {"date": date.today().isoformat(), "machine": f"{platform.node()} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'})",
            "model": str(args.model), "split": args.split, "variety": args.variety, "attention": "dense (transformers SDPA)",
            "dtype": str(dtype)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "bits_per_byte": bpb, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

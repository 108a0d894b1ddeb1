"""Train rcengine's embedded default model (run on the GPU machine; see train/README.md).

    python train/train_model.py --data .train_data --out OUT [--init DIR] [--phases 2048:300,8192:150,16384:90]

A Llama-architecture model (rotary positions, 4 query heads sharing 2 KV heads of dim 64) is
trained from scratch, or continued from ``--init``, on the natural-English corpus mixed with task
examples from the train split of the task suite (bench/tasks.py): short sequences first, then
long ones.  Each phase is ``SEQ:SECONDS``; the learning rate follows a time-based warmup and
cosine schedule over all phases.  Writes the model (safetensors, bf16) with its tokenizer, and
appends one JSON line per logged step to OUT/train_log.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
if "rcengine" not in sys.modules:  # this checkout's package, whatever its folder is called (rcengine/__init__ is light)
    _spec = importlib.util.spec_from_file_location("rcengine", ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    sys.modules["rcengine"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["rcengine"])
tasks = importlib.import_module("rcengine.bench.tasks")

# Model shape (about 7.4 M parameters with tied embeddings).
MODEL = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 32768, "rope_theta": 500000.0}
TASK_WEIGHTS = {"niah_single_number": 3, "niah_single_word": 2, "niah_multikey": 2, "niah_multivalue": 1, "niah_multiquery": 1,
                "variable_tracking": 1, "common_words": 0.5, "frequent_words": 0.5, "qa_facts": 1.5}
TASK_SHARE = 0.5  # rows that are task examples; the rest are plain text windows
ANSWER_WEIGHT = 5.0  # loss weight of answer tokens


class Data:
    def __init__(self, folder: Path) -> None:
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.bos, self.eos, self.pad = (self.tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
        self.tokens = {s: np.fromfile(folder / f"{s}.u16", dtype=np.uint16) for s in ("train", "dev", "eval") if (folder / f"{s}.u16").exists()}

    def count(self, text: str) -> int:
        return len(self.tok.encode(text).ids)

    def haystack(self, split: str):  # noqa: ANN201
        arr = self.tokens["train" if split == "train" else split]

        def fn(rng: random.Random, n_chars: int) -> str:
            n = min(len(arr) - 1, int(n_chars / 2.5) + 64)
            start = rng.randrange(0, max(1, len(arr) - n))
            text = self.tok.decode(arr[start : start + n].tolist()).replace("</s>", " ")
            return text[:n_chars]

        return fn

    def generator(self, split: str, variety: "tasks.Variety | None" = None) -> "tasks.TaskGenerator":
        return tasks.TaskGenerator(split, self.haystack(split), self.count, variety)

    def task_row(self, gen: "tasks.TaskGenerator", task: str, seq: int, seed: int) -> tuple[list[int], list[float]] | None:
        """A task example's tokens and loss weights, or None if its needles alone do not fit ``seq``."""
        length = seq - 64
        while length > 0:  # the answer must fit: shorten the context until it does
            ex = gen.example(task, length, seed)
            prompt = [self.bos] + self.tok.encode(ex.prompt).ids
            answer = self.tok.encode(" " + ", ".join(ex.answers) + ".").ids + [self.eos]
            over = len(prompt) + len(answer) - seq
            if over <= 0:
                return prompt + answer, [1.0] * len(prompt) + [ANSWER_WEIGHT] * len(answer)
            length -= over + 32
        return None

    def text_row(self, rng: random.Random, seq: int) -> tuple[list[int], list[float]]:
        arr = self.tokens["train"]
        start = rng.randrange(0, len(arr) - seq)
        return [self.bos] + arr[start : start + seq - 1].tolist(), [1.0] * seq


class Rows(torch.utils.data.IterableDataset):
    def __init__(self, folder: Path, seq: int, seed: int, variety: bool = False) -> None:
        self.folder, self.seq, self.seed, self.variety = folder, seq, seed, variety

    def __iter__(self):  # noqa: ANN204
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        data = Data(self.folder)
        gen = data.generator("train", tasks.TRAIN_VARIETY if self.variety else None)
        rng = random.Random(self.seed * 1000 + wid)
        names, weights = list(TASK_WEIGHTS), list(TASK_WEIGHTS.values())
        while True:
            row = data.task_row(gen, rng.choices(names, weights)[0], self.seq, rng.randrange(1 << 30)) if rng.random() < TASK_SHARE else None
            ids, w = row if row is not None else data.text_row(rng, self.seq)
            pad = self.seq - len(ids)
            yield torch.tensor(ids + [data.pad] * pad), torch.tensor(w + [0.0] * pad)


def lr_at(progress: float, peak: float, warmup: float = 0.03) -> float:
    if progress < warmup:
        return peak * progress / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def _save_checkpoint(folder: Path, model: LlamaForCausalLM, opt: torch.optim.Optimizer, state: dict) -> None:
    """Model (float32), optimizer state and where the run stands, written to a temporary folder and
    renamed into place (a checkpoint is whole or absent)."""
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp / "model", safe_serialization=True)
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".train_data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--init", type=Path, default=None, help="continue from this model folder")
    parser.add_argument("--phases", default="2048:300,8192:150,16384:90", help="SEQ:SECONDS,...")
    parser.add_argument("--tokens-per-step", type=int, default=65536)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model and short phases, for a smoke test")
    parser.add_argument("--shape", default="", help="model shape overrides, e.g. hidden_size=384,num_hidden_layers=10,rope_theta=2e6")
    parser.add_argument("--stop-after", type=float, default=None,
                        help="train at most this many seconds in this command, then save OUT/checkpoint and exit "
                             "(the GPU machine allows 10 minutes a command); continue with --resume OUT/checkpoint")
    parser.add_argument("--resume", type=Path, default=None, help="continue a stopped run from its checkpoint folder (same --phases)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="where --stop-after saves the checkpoint (default OUT/checkpoint; keep it out of a GPU run's $OUT, "
                             "whose files come back: the optimizer state alone is twice the float32 model)")
    parser.add_argument("--variety", action="store_true",
                        help="task examples draw phrasings, key and value shapes, haystack sources and chain shapes "
                             "(bench/tasks.py TRAIN_VARIETY) instead of RULER's one form")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    data = Data(args.data)
    shape = dict(MODEL, num_hidden_layers=2, hidden_size=128, intermediate_size=256) if args.tiny else dict(MODEL)
    for item in filter(None, args.shape.split(",")):
        name, value = item.split("=")
        if name not in MODEL:
            parser.error(f"--shape: {name} is not one of {', '.join(MODEL)}")
        shape[name] = type(MODEL[name])(float(value))
    if args.resume:
        model = LlamaForCausalLM.from_pretrained(args.resume / "model", dtype=torch.float32, attn_implementation="sdpa")
    elif args.init:
        model = LlamaForCausalLM.from_pretrained(args.init, dtype=torch.float32, attn_implementation="sdpa")
    else:
        cfg = LlamaConfig(vocab_size=data.tok.get_vocab_size(), bos_token_id=data.bos, eos_token_id=data.eos, pad_token_id=data.pad,
                          tie_word_embeddings=True, **shape)
        model = LlamaForCausalLM(cfg)
        model.set_attn_implementation("sdpa")
    model.to(dev).train()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=dev.type == "cuda")
    phases = [(int(a), float(b)) for a, b in (p.split(":") for p in args.phases.split(","))]
    total = sum(s for _, s in phases)
    args.out.mkdir(parents=True, exist_ok=True)
    log = open(args.out / "train_log.jsonl", "a")
    # Where a stopped run stands: phases done, seconds into the current one, steps, tokens, seconds.
    run = {"phase": 0, "phase_elapsed": 0.0, "step": 0, "tokens": 0, "seconds": 0.0, "phases": phases}
    if args.resume:
        run = json.loads((args.resume / "state.json").read_text())
        if [tuple(p) for p in run["phases"]] != phases:
            parser.error(f"--phases must be the stopped run's: {run['phases']}")
        opt.load_state_dict(torch.load(args.resume / "optimizer.pt", map_location=dev, weights_only=True))
    log.write(json.dumps({"event": "resume" if args.resume else "start", "params": params, "phases": phases, "init": str(args.init),
                          "lr": args.lr, "variety": args.variety, "shape": shape, "tokens_per_step": args.tokens_per_step,
                          "device": str(dev), "at": {k: run[k] for k in ("phase", "phase_elapsed", "step")}}) + "\n")
    start = time.time() - run["seconds"]
    command_start, step, tokens = time.time(), run["step"], run["tokens"]
    done = sum(s for _, s in phases[: run["phase"]])
    for index, (seq, seconds) in enumerate(phases):
        if index < run["phase"]:
            continue
        already = run["phase_elapsed"] if index == run["phase"] else 0.0
        batch = max(1, args.tokens_per_step // seq)
        rows = Rows(args.data, seq, args.seed + seq + 7919 * int(already), args.variety)  # a resumed phase draws new rows
        loader = torch.utils.data.DataLoader(rows, batch_size=batch, num_workers=args.workers,
                                             pin_memory=dev.type == "cuda", prefetch_factor=4 if args.workers else None)
        phase_start = time.time() - already
        for ids, weights in loader:
            elapsed = time.time() - phase_start
            if elapsed >= seconds:
                break
            if args.stop_after is not None and time.time() - command_start >= args.stop_after:
                checkpoint = args.checkpoint or args.out / "checkpoint"
                _save_checkpoint(checkpoint, model, opt, {
                    "phase": index, "phase_elapsed": elapsed, "step": step, "tokens": tokens,
                    "seconds": time.time() - start, "phases": phases})
                log.write(json.dumps({"event": "stop", "phase": index, "phase_elapsed": round(elapsed, 1), "steps": step,
                                      "tokens": tokens, "seconds": round(time.time() - start, 1)}) + "\n")
                log.close()
                print(f"stopped after {args.stop_after} s: continue with --resume {checkpoint}")
                return
            for group in opt.param_groups:
                group["lr"] = lr_at((done + elapsed) / total, args.lr)
            ids, weights = ids.to(dev, non_blocking=True), weights.to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                logits = model(input_ids=ids).logits
            loss_tok = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                         reduction="none")
            w = weights[:, 1:].reshape(-1)
            loss = (loss_tok * w).sum() / w.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            tokens += ids.numel()
            if step % 25 == 0:
                rec = {"step": step, "seq": seq, "loss": round(loss.item(), 4), "lr": opt.param_groups[0]["lr"], "tokens": tokens,
                       "elapsed_s": round(time.time() - start, 1), "tokens_per_s": round(tokens / (time.time() - start))}
                log.write(json.dumps(rec) + "\n")
                log.flush()
                print(json.dumps(rec), flush=True)
        done += seconds
        del loader
    model.eval()
    # bf16 shards of at most 16 MiB: a GPU command can bring each back (issue 14)
    model.to(torch.bfloat16).save_pretrained(args.out / "model", safe_serialization=True, max_shard_size=16 << 20)
    fast = PreTrainedTokenizerFast(tokenizer_object=data.tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(args.out / "model")
    log.write(json.dumps({"event": "end", "steps": step, "tokens": tokens, "seconds": round(time.time() - start, 1)}) + "\n")
    log.close()
    print(f"saved {args.out / 'model'} after {step} steps, {tokens} tokens")


if __name__ == "__main__":
    main()

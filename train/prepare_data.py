"""Train the tokenizer and tokenize the corpus for training (run on the CPU machine).

    python train/prepare_data.py [--corpus .corpus] [--out .train_data] [--vocab 4096]

A byte-level BPE (``tokenizers``) is trained on the train split; the train split is sampled down
to about ``--train-mb`` per source mix below and written as uint16 token ids (documents separated
by the end-of-text token); the held-out split is written whole (first half of its documents: dev
haystack, second half: eval haystack).  Outputs: tokenizer.json, train.u16, heldout.u16, dev.u16,
eval.u16, data.json.  These travel to the GPU machine (they are not committed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIALS = ["<s>", "</s>", "<pad>"]
# Share of the sampled training text per source (the dictionary dominates the raw corpus).
MIX = {"python3.11-doc": 0.35, "dict-gcide": 0.35, "wordnet-base": 0.22, "python-stdlib": 0.08}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(".corpus"))
    parser.add_argument("--out", type=Path, default=Path(".train_data"))
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--train-mb", type=float, default=60.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    train = load(args.corpus / "train.jsonl")
    by_source: dict[str, list[str]] = {}
    for d in train:
        by_source.setdefault(d["source"], []).append(d["text"])
    sample: list[str] = []
    for source, share in MIX.items():
        docs = by_source.get(source, [])
        rng.shuffle(docs)
        budget, size = share * args.train_mb * 1e6, 0
        for text in docs:
            if size >= budget:
                break
            sample.append(text)
            size += len(text)
    rng.shuffle(sample)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=True)
    tok.train_from_iterator(sample[: max(1, len(sample) // 3)], trainer)
    tok.save(str(args.out / "tokenizer.json"))
    eos = tok.token_to_id("</s>")

    def encode(texts: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.encode_batch(texts):
            ids.extend(enc.ids)
            ids.append(eos)
        return np.asarray(ids, dtype=np.uint16)

    train_ids = encode(sample)
    train_ids.tofile(args.out / "train.u16")
    held = sorted(load(args.corpus / "eval.jsonl"), key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    dev, ev = held[: len(held) // 2], held[len(held) // 2 :]
    encode([d["text"] for d in dev]).tofile(args.out / "dev.u16")
    encode([d["text"] for d in ev]).tofile(args.out / "eval.u16")
    info = {
        "vocab": tok.get_vocab_size(), "train_tokens": int(train_ids.size), "train_bytes": sum(len(t) for t in sample),
        "dev_documents": len(dev), "eval_documents": len(ev), "bytes_per_token": sum(len(t.encode()) for t in sample) / train_ids.size,
    }
    (args.out / "data.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()

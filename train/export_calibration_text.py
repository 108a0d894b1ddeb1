"""Export the embedded model's calibration text (shipped): training-split text only.

    python train/export_calibration_text.py

``rcengine calibrate`` fits the learned completion maps on the model's own activations over this
text.  It must never be eval-split text: the haystack is this Python's standard-library docstrings
of the documents ``build_corpus.py`` puts in the train split (the same hash rule; PSF licence, made
here with no download), and the tasks are ``bench/tasks.py``'s train split (train-split key words),
every task with its reference answer appended, at 4096, 8192 and 15872 tokens in turn (the lengths
decode is measured at; under calibrate's 16384-token cut), plus two plain stretches of text.
Writes ``engine/default_model/calibration.jsonl.gz`` (one JSON string per text; the same input gives
the same bytes) and prints the text count and the file's SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "engine" / "default_model" / "calibration.jsonl.gz"
LENGTHS = (4096, 8192, 15872)


def train_documents() -> list[str]:
    sys.path.insert(0, str(ROOT / "train"))
    from build_corpus import EVAL_EVERY, stdlib_docstrings

    return [text for doc_id, text in stdlib_docstrings()
            if int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % EVAL_EVERY != 0]


def main() -> None:
    sys.path.insert(0, str(ROOT.parent))
    from rcengine.bench.haystacks import corpus_haystack
    from rcengine.bench.tasks import TASKS, TaskGenerator
    from transformers import AutoTokenizer

    docs = train_documents()
    tok = AutoTokenizer.from_pretrained(ROOT / "engine" / "default_model", local_files_only=True)
    gen = TaskGenerator("train", corpus_haystack(docs), lambda t: len(tok(t)["input_ids"]))
    texts = []
    for i, task in enumerate(TASKS):
        ex = gen.example(task, LENGTHS[i % len(LENGTHS)], seed=1000 + i)
        texts.append(ex.prompt + " " + ex.answers[0])
    haystack = corpus_haystack(docs)
    for seed in (1, 2):
        texts.append(haystack(random.Random(f"calibration/{seed}"), 4096 * 3))
    payload = "".join(json.dumps(t) + "\n" for t in texts).encode()
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(payload)
    print(json.dumps({"texts": len(texts), "characters": sum(map(len, texts)), "file": str(OUT.relative_to(ROOT)),
                      "bytes": OUT.stat().st_size, "sha256": hashlib.sha256(OUT.read_bytes()).hexdigest()}))


if __name__ == "__main__":
    main()

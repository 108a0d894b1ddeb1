"""Export the held-out eval split's text for the task suite's haystack (shipped with the package).

    python train/export_eval_haystack.py [--data .train_data] [--tokens 200000]

Decodes whole documents of ``eval.u16`` (written by prepare_data.py; never trained on) until about
``--tokens`` tokens, and writes them gzipped to ``engine/demo/eval_haystack.jsonl.gz`` (one JSON
string per document), so that ``rcengine bench-io`` and the tests build eval-split contexts on a
fresh machine.  Prints the file's sha256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

OUT = Path(__file__).resolve().parent.parent / "engine" / "demo" / "eval_haystack.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(".train_data"))
    parser.add_argument("--tokens", type=int, default=200_000)
    args = parser.parse_args()
    tok = Tokenizer.from_file(str(args.data / "tokenizer.json"))
    arr = np.fromfile(args.data / "eval.u16", dtype=np.uint16)
    eos = tok.token_to_id("</s>")
    ends = np.flatnonzero(arr == eos)
    docs, start, total = [], 0, 0
    for end in ends:
        if total >= args.tokens:
            break
        docs.append(tok.decode(arr[start:end].tolist()))
        total += int(end - start)
        start = int(end) + 1
    payload = "".join(json.dumps(d) + "\n" for d in docs).encode()
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:  # mtime 0: the same input gives the same bytes
        f.write(payload)
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(json.dumps({"documents": len(docs), "tokens": total, "file": str(OUT), "bytes": OUT.stat().st_size, "sha256": digest}))


if __name__ == "__main__":
    main()

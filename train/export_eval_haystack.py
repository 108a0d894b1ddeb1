"""Export the held-out eval split's Python documentation for the task suite's haystack (shipped).

    python train/export_eval_haystack.py [--corpus .corpus]

Takes the eval half of the held-out documents exactly as ``prepare_data.py`` splits them (sorted
by the SHA-256 of their id, second half; never trained on), keeps those under the Python Software
Foundation licence (``python3.11-doc``, ``python-stdlib``: the dictionary sources are GPL and are
not redistributed), and writes them gzipped to ``bench/data/eval_haystack.jsonl.gz`` (one JSON
string per document), so that ``rcengine bench-io`` and the tests build eval-split contexts on a
fresh machine.  Prints the document count and the file's SHA-256.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "bench" / "data" / "eval_haystack.jsonl.gz"
SOURCES = ("python3.11-doc", "python-stdlib")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path(".corpus"))
    args = parser.parse_args()
    held = [json.loads(line) for line in (args.corpus / "eval.jsonl").open()]
    held.sort(key=lambda d: hashlib.sha256(d["id"].encode()).hexdigest())
    docs = [d["text"] for d in held[len(held) // 2 :] if d["source"] in SOURCES]
    payload = "".join(json.dumps(d) + "\n" for d in docs).encode()
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:  # mtime 0: the same input gives the same bytes
        f.write(payload)
    digest = hashlib.sha256(OUT.read_bytes()).hexdigest()
    print(json.dumps({"documents": len(docs), "characters": sum(map(len, docs)), "file": str(OUT), "bytes": OUT.stat().st_size, "sha256": digest}))


if __name__ == "__main__":
    main()

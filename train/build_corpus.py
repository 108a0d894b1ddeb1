"""Build the natural-English training corpus from Debian packages and what Python ships.

    python train/build_corpus.py [--out .corpus]

Sources (all from the Debian registry, or from this Python):
- python3.11-doc: the Python documentation (Texinfo file), one document per node;
- dict-gcide: the Collaborative International Dictionary of English, entries grouped by ~16 KB;
- wordnet-base: WordNet's glosses and examples, grouped by ~16 KB;
- this Python's standard library docstrings, one document per module.

Writes ``train.jsonl`` and ``eval.jsonl`` (about 2 % of documents, chosen by a hash of the
document id) and ``manifest.json``: package versions, .deb SHA-256, licences (from each package's
copyright file), document and byte counts, and the SHA-256 of each output.  The corpus itself is
not committed (mixed licences); this script and ``train/corpus_manifest.json`` are.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import json
import pkgutil
import re
import subprocess
import sys
import warnings
from pathlib import Path

PACKAGES = ("python3.11-doc", "dict-gcide", "wordnet-base")
EVAL_EVERY = 50  # 1 document in 50 (2 %) is held out
GROUP_BYTES = 16_000
_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(out: Path) -> list[dict]:
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=debs, check=True, capture_output=True)
    info = []
    for name in PACKAGES:
        deb = next(debs.glob(f"{name}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(out / "root")], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True).stdout.strip()
        copyright_file = next((out / "root/usr/share/doc").glob(f"{name}/copyright"), None)
        licence = _licence(copyright_file.read_text(errors="replace")) if copyright_file else "unknown"
        info.append({"name": name, "version": version, "deb": deb.name, "sha256": sha256(deb), "licence": licence})
    return info


def _licence(text: str) -> str:
    short = r"[\w.+-]+(?:\s+(?:or|and)\s+[\w.+-]+)*"
    found = [f.strip() for f in re.findall(r"^License:\s*(.+)$", text, flags=re.M) if re.fullmatch(short, f.strip())]
    if found:
        return ", ".join(sorted(set(f.strip() for f in found)))
    for key in ("Python Software Foundation", "WordNet", "GNU General Public License"):
        if key in text:
            return key
    return text.strip().splitlines()[0][:120]


def python_docs(root: Path):
    text = gzip.decompress((root / "usr/share/info/python3.11.info.gz").read_bytes()).decode("utf-8", "replace")
    for i, node in enumerate(text.split("\x1f")):
        lines = [ln for ln in node.splitlines() if not ln.startswith(("File: ", "* ", "Tag Table", "\x7f"))]
        body = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if len(body) > 500:
            yield f"pydoc-{i}", body


def gcide(root: Path):
    data = gzip.decompress((root / "usr/share/dictd/gcide.dict.dz").read_bytes()).decode("utf-8", "replace")
    entries = []
    for line in (root / "usr/share/dictd/gcide.index").read_text(errors="replace").splitlines():
        head, off, length = line.split("\t")[:3]
        if head.startswith("00-"):
            continue
        entry = data[_b64(off) : _b64(off) + _b64(length)]
        entry = re.sub(r"\[(1913 Webster|Webster 1913 Suppl\.|PJC|WordNet 1\.5)\]", "", entry)
        entries.append(re.sub(r"[ \t]*\n[ \t]*", "\n", re.sub(r"[ \t]+", " ", entry)).strip())
    yield from _grouped("gcide", entries)


def _b64(s: str) -> int:
    n = 0
    for c in s:
        n = n * 64 + _B64[c]
    return n


def wordnet(root: Path):
    lines = []
    for pos in ("noun", "verb", "adj", "adv"):
        for line in (root / f"usr/share/wordnet/data.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            words = fields.split()[4 : 4 + 2 * int(fields.split()[3], 16) : 2]
            lines.append(f"{', '.join(w.replace('_', ' ') for w in words)}: {gloss.strip()}")
    yield from _grouped("wordnet", lines)


def stdlib_docstrings():
    warnings.filterwarnings("ignore")
    names = sorted(m.name for m in pkgutil.iter_modules() if m.module_finder.path.startswith(sys.base_prefix) and "site-packages" not in m.module_finder.path)
    for name in names:
        if name.startswith(("_", "test", "idlelib", "tkinter", "turtle", "antigravity", "this")):
            continue
        try:
            module = importlib.import_module(name)
        except BaseException:  # noqa: BLE001 (some stdlib modules fail to import on this platform)
            continue
        parts = [inspect.getdoc(module) or ""]
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attr}: {doc}")
        body = "\n\n".join(p for p in parts if p).strip()
        if len(body) > 500:
            yield f"stdlib-{name}", body


def _grouped(prefix: str, items: list[str]):
    group, size, k = [], 0, 0
    for item in items:
        group.append(item)
        size += len(item)
        if size >= GROUP_BYTES:
            yield f"{prefix}-{k}", "\n\n".join(group)
            group, size, k = [], 0, k + 1
    if group:
        yield f"{prefix}-{k}", "\n\n".join(group)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".corpus"))
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    packages = fetch(out)
    root = out / "root"
    counts = {"train": [0, 0], "eval": [0, 0]}
    sources: dict[str, int] = {}
    with open(out / "train.jsonl", "w") as train, open(out / "eval.jsonl", "w") as held:
        for source, docs in (("python3.11-doc", python_docs(root)), ("dict-gcide", gcide(root)),
                             ("wordnet-base", wordnet(root)), ("python-stdlib", stdlib_docstrings())):
            for doc_id, text in docs:
                split = "eval" if int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % EVAL_EVERY == 0 else "train"
                (held if split == "eval" else train).write(json.dumps({"id": doc_id, "source": source, "text": text}) + "\n")
                counts[split][0] += 1
                counts[split][1] += len(text.encode())
                sources[source] = sources.get(source, 0) + len(text.encode())
    manifest = {
        "packages": packages,
        "python": {"version": sys.version.split()[0], "licence": "PSF-2.0 (standard library docstrings)"},
        "documents": {k: v[0] for k, v in counts.items()},
        "bytes": {k: v[1] for k, v in counts.items()},
        "bytes_by_source": sources,
        "outputs": {name: sha256(out / name) for name in ("train.jsonl", "eval.jsonl")},
        "eval_rule": f"sha256(document id) % {EVAL_EVERY} == 0",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(json.dumps({k: manifest[k] for k in ("documents", "bytes", "bytes_by_source")}, indent=1))


if __name__ == "__main__":
    main()

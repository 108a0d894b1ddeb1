"""bench-io's plots (quality against bytes read; rc's gain over topk by attention entropy), and
the helpers the report shares with them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..storage.atomic_file import write_atomic
from .io_analysis import ENTROPY_BINS

FAMILIES = ("topk", "rc-centroid", "rc-favor")


def bin_errors(report: dict[str, Any]) -> dict[tuple[str, float, str], float | None]:
    out = {}
    for b in report["entropy_bins"]:
        h = b["head_queries"]
        out[family(b), b["budget"], b["bin"]] = h["rel_error"] if h else None
    return out


def plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality = report["meta"]["quality_tier"]
    per_token = _kv_bytes_per_token_read(report)
    lengths = sorted({r["length"] for r in report["overview"]})
    fig, grid = plt.subplots(len(lengths), 3, figsize=(16, 4.4 * len(lengths)), squeeze=False)
    panels = (("KL vs dense (nats/position)", "kl", False), ("KL vs dense, summary charged", "kl", True),
              ("task accuracy", "accuracy", False))
    for axes, length in zip(grid, lengths, strict=True):
        rows = [r for r in report["overview"] if r["tier"] == quality and r["length"] == length]
        for ax, (title, metric, charged) in zip(axes, panels, strict=True):
            for fam, marker in zip(FAMILIES, "osD", strict=True):
                pts = sorted((r["budget"], r) for r in rows if family(r) == fam and r[metric] is not None)
                if pts:
                    ax.plot([_x(r, charged, per_token) for _, r in pts], [r[metric] for _, r in pts], marker=marker, label=fam)
            for r in rows:
                if r["method"] == "dense":
                    ax.axvline(_x(r, charged, per_token), color="grey", ls=":", label="dense (reads everything)")
                if r["method"] == "sink-tail" and r[metric] is not None:
                    ax.axhline(r[metric], color="grey", ls="--", label="sink-tail (reads nothing)")
            ax.set_xscale("log")
            if metric == "kl":
                ax.set_yscale("log")
            ax.set_xlabel("KV bytes per decoded token" + (" + summary bytes" if charged else " (logical)"))
            ax.set_title(f"{title}, {length} tokens")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
    fig.suptitle(f"bench-io: quality against bytes read ({report['meta']['model']}, {report['meta']['date']})")
    fig.tight_layout()
    p1 = out / "quality_vs_bytes.png"
    _save(fig, p1)
    plt.close(fig)

    err = bin_errors(report)
    budgets = sorted({b for (m, b, _) in err if m == "topk"})
    fams = [f for f in FAMILIES[1:] if any(m == f for (m, _, _) in err)]
    fig, axes = plt.subplots(1, max(len(fams), 1), figsize=(6 * max(len(fams), 1), 4.2), squeeze=False)
    bins = [n for n, _, _ in ENTROPY_BINS]
    for ax, fam in zip(axes[0], fams, strict=False):
        width = 0.8 / max(len(budgets), 1)
        for i, b in enumerate(budgets):
            gains = []
            for name in bins:
                t, r = err.get(("topk", b, name)), err.get((fam, b, name))
                gains.append(t / r if t and r else math.nan)
            ax.bar([j + i * width for j in range(len(bins))], gains, width, label=f"budget {100 * b:.3g} %")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks([j + width * (len(budgets) - 1) / 2 for j in range(len(bins))], bins)
        ax.set_yscale("log")
        ax.set_xlabel("head's attention entropy")
        ax.set_ylabel("topk error / rc error (>1: rc better)")
        ax.set_title(f"{fam} over topk, same budget")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    p2 = out / "rc_gain_by_entropy.png"
    _save(fig, p2)
    plt.close(fig)
    return [p1, p2]


def family(r: dict[str, Any]) -> str:
    """``topk``, ``rc-centroid``...: the method with its estimator, and its selector unless exact."""
    base = f"rc-{r['estimator']}" if r["method"] == "rc" else r["method"]
    return base if r.get("selector") in (None, "exact") else f"{base}-{r['selector']}"


def _kv_bytes_per_token_read(report: dict[str, Any]) -> float:
    """Bytes of one token's K and V over all layers and KV heads."""
    meta = report["meta"]
    return meta["row_bytes"] * meta["kv_shape"]["layers"] * meta["kv_shape"]["kv_heads"]


def _x(r: dict[str, Any], charged: bool, per_token: float) -> float:
    tokens = r["token_equivalent"]["bytes" if charged else "support"] or 0.0
    return max(tokens * per_token, 1.0)


def _save(fig, path: Path) -> None:  # noqa: ANN001
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110), suffix=".png")

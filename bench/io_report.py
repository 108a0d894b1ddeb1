"""Writing a ``bench-io`` report: ``report.json``, ``report.md``, two PNG plots, and the terminal table.

Every file is written under a temporary name and renamed into place, so an interrupted run never
leaves a half-written report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from ..storage.atomic_file import write_atomic
from .io_analysis import ENTROPY_BINS
from .io_plots import FAMILIES, bin_errors, plots


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the report files into ``out_dir`` (created if needed); -> their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _atomic(out / "report.json", json.dumps(report, indent=1, default=_json_default).encode()),
        _atomic(out / "report.md", markdown(report).encode()),
    ]
    paths += plots(report, out)
    return paths


def _json_default(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"{type(x).__name__} is not JSON-serialisable")


def _atomic(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


# -- numbers -------------------------------------------------------------------------------------

def _f(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _bandwidth(x: float | None) -> str:
    return "-" if x is None else _bytes(x) + "/s"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.3g} %"


# -- terminal ------------------------------------------------------------------------------------

def overview_table(report: dict[str, Any]) -> Table:
    """One line per variant and tier at the longest length, pooled over tasks."""
    bw = [name for name, _ in report["meta"]["config"]["bandwidths"]]
    length = max((r["length"] for r in report["overview"]), default=0)
    table = Table(title=f"bench-io at {length} tokens: {report['meta']['model']} ({report['meta']['machine']})")
    for col in ("variant", "tier", "accuracy", "KL nats", "d loglik/tok", "recall@K", "read/token", "moved/token",
                "selection/token", "tokens read", "+ summary", "ms/token", *[f"ms @ {b}" for b in bw]):
        table.add_column(col, justify="left" if col in ("variant", "tier") else "right")
    for r in (r for r in report["overview"] if r["length"] == length):
        table.add_row(
            r["variant"], r["tier"], _f(r["accuracy"], 2), _f(r["kl"]), _f(r["loglik_delta_per_token"]), _f(r["recall_at_k"], 2),
            _bytes(r["bytes_per_token"]["logical"]), _bytes(r["bytes_per_token"]["physical"]), _bytes(r["index_bytes_per_token"]),
            _f(r["token_equivalent"]["support"]), _f(r["token_equivalent"]["bytes"]), _f(r["ms_per_token"]),
            *[_f(r["modelled_ms_per_token"].get(b)) for b in bw],
        )
    return table


# -- markdown ------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    meta, cfg = report["meta"], report["meta"]["config"]
    bw = cfg["bandwidths"]
    out = [
        f"# bench-io report, {meta['date']}\n",
        f"- machine: {meta['machine']}; model `{meta['model']}` ({meta['dtype']}, {meta['kv_shape']}); "
        f"versions {meta['versions']}",
        f"- eval split ({cfg.get('haystack', 'text')} haystack), lengths {cfg['lengths']}, tasks {', '.join(cfg['tasks'])}, {cfg['examples']} example(s) each; "
        f"sink {cfg['sink']}, tail {cfg['tail']}, {cfg['features']} features; {meta.get('examples_run', '?')} of "
        f"{meta.get('examples_planned', '?')} examples run; wall time {meta['wall_s']} s",
        f"- reference: {meta['reference']}; quality measured on the `{meta['quality_tier']}` tier (every tier attends "
        "identically: the answers on the others are checked to match)",
        "- KL: KL(reference || variant) in nats per position, pooled over reference-answer and held-out-text positions; "
        "d loglik: log-likelihood of the reference answer minus the reference's, per token",
        "- read / moved: logical / physical bytes per decoded token from the KV tier (all layers and KV heads; the "
        f"disk tier's block cache of {_bytes(cfg['cache_bytes'])} is emptied before every answer); selection (index) bytes apart",
        "- tokens read: per KV head and layer per decoded token; `+ summary` adds the summary's size T_phi (the bytes accounting)",
        f"- ms/token: median of {cfg.get('timing_rounds', '?')} interleaved rounds of {cfg.get('timing_tokens', '?')}-step "
        "decodes (end of sequence ignored, cold block cache) on each length's first example; modelled ms: the quality "
        "tier's ms/token (compute) + moved bytes / bandwidth, at " + ", ".join(f"{n} {_bandwidth(b)}" for n, b in bw) + "\n",
    ]
    for length in sorted({r["length"] for r in report["overview"]}):
        out += [f"## Overview at {length} tokens (all tasks)\n", _overview_md([r for r in report["overview"] if r["length"] == length], bw)]
    out += [
        "\n## rc against topk: quality-matched budget and break-even bandwidth\n",
        "rho* = b' / b, where rc at budget b' has topk's KL at budget b (interpolated in log budget; `at most`: "
        "rc's smallest budget already matches). Break-even: rc is faster in time at equal quality when the I/O "
        "bandwidth is below it (`below`), at any bandwidth (`always`), or never; from the timed ms/token on the "
        "quality tier and each tier's moved bytes. The last column compares the two as timed on the tier itself.\n",
        _md_table(
            ["length", "estimator", "topk budget", "topk KL", "rc budget", "rho*", "tier", "bytes saved/token", "compute added (ms)",
             "break-even", *[f"faster @ {n}" for n, _ in bw], "measured ms on tier: topk / rc"],
            _tradeoff_rows(report, bw),
        ),
    ]
    out += _rest(report)
    return "\n".join(out)


def _overview_md(rows: list[dict], bw: list) -> str:
    return _md_table(
        ["variant", "tier", "accuracy", "KL", "KL answer", "KL held-out", "d loglik/tok", "recall@K", "read/token", "moved/token",
         "selection/token", "tokens read", "+ summary", "ms/token", *[f"ms @ {n}" for n, _ in bw], "same answers"],
        [[r["variant"], r["tier"], _f(r["accuracy"], 2), _f(r["kl"]), _f(r["kl_answer"]), _f(r["kl_heldout"]),
          _f(r["loglik_delta_per_token"]), _f(r["recall_at_k"], 2), _bytes(r["bytes_per_token"]["logical"]), _bytes(r["bytes_per_token"]["physical"]),
          _bytes(r["index_bytes_per_token"]), _f(r["token_equivalent"]["support"]), _f(r["token_equivalent"]["bytes"]),
          _f(r["ms_per_token"]), *[_f(r["modelled_ms_per_token"].get(n)) for n, _ in bw],
          "yes" if r["answers_match_quality_tier"] else "NO"] for r in rows],
    )


def _rest(report: dict[str, Any]) -> list[str]:
    return [
        "\n## By attention entropy (normalised entropy of the head's dense attention: "
        + ", ".join(f"{n} [{lo}, {min(hi, 1.0)})" for n, lo, hi in ENTROPY_BINS) + ")\n",
        "Per sampled query head: attention-output relative error against dense, the true mass share of the unread "
        "tokens, and (rc) log(estimated / true unread mass), its mean and mean absolute value. Per position: KL, "
        "binned by the mean entropy over layers and heads; per example: accuracy, binned by its answer positions' mean.\n",
        _md_table(
            ["variant", "bin", "head queries", "rel error", "unread share", "mass log-ratio", "abs log-ratio", "dropped",
             "positions", "KL", "examples", "accuracy"],
            [[b["variant"], b["bin"], *_head_cells(b["head_queries"]), str(b["positions"]), _f(b["kl"]), str(b["examples"]),
              _f(b["accuracy"], 2)] for b in report["entropy_bins"] if b["method"] != "dense"],
        ),
        "\n## rc's gain over topk at the same budget, by entropy bin (topk error / rc error)\n",
        _md_table(["budget", "estimator", *[n for n, _, _ in ENTROPY_BINS]], _gain_rows(report)),
        "\n## Accuracy by task and length\n",
        _task_table(report),
        "\n## Per layer and head (mean relative error at budget " + _pct(_focus_budget(report)) + ")\n",
        _head_table(report),
    ]


def _head_cells(h: dict | None) -> list[str]:
    if not h:
        return ["0", "-", "-", "-", "-", "-"]
    return [str(h["queries"]), _f(h["rel_error"]), _f(h["residual_share"]), _f(h["mass_log_ratio"]),
            _f(h["mass_abs_log_ratio"]), str(h["estimate_dropped"])]


def _tradeoff_rows(report: dict[str, Any], bw: list) -> list[list[str]]:
    rows = []
    for t in report["tradeoff"]:
        head = [str(t["length"]), t["estimator"], _pct(t["topk_budget"]), _f(t["topk_kl"]),
                ("<= " if t["match"] == "at most" else "") + _pct(t["rc_budget"]) if t["rc_budget"] else "not reached",
                ("<= " if t["match"] == "at most" else "") + _f(t["rho_star"]) if t["rho_star"] is not None else "-"]
        if not t["tiers"]:
            rows.append(head + ["-"] * (5 + len(bw)))
        for tier, x in t["tiers"].items():
            be, m = x["break_even"], x.get("measured")
            rows.append(head + [tier, _bytes(x["saved_bytes_per_token"]), _f(x["compute_overhead_ms"]),
                                f"{be['rc_faster']} {_bandwidth(be['bandwidth'])}" if be["bandwidth"] else be["rc_faster"],
                                *["yes" if x["modelled"][n]["rc_faster"] else "no" for n, _ in bw],
                                "-" if not m else f"{_f(m['topk_ms'])} / {_f(m['rc_ms'])}" + (" (rc faster)" if m["rc_faster"] else "")])
    return rows


def _gain_rows(report: dict[str, Any]) -> list[list[str]]:
    err = bin_errors(report)
    budgets = sorted({b for (m, b, _) in err if m == "topk"})
    rows = []
    for b in budgets:
        for fam in FAMILIES[1:]:
            if (fam, b, "low") not in err:
                continue
            cells = []
            for name, _, _ in ENTROPY_BINS:
                t, r = err.get(("topk", b, name)), err.get((fam, b, name))
                cells.append("-" if not t or not r else f"{t / r:.3g}x ({_f(t)} / {_f(r)})")
            rows.append([_pct(b), fam.removeprefix("rc-"), *cells])
    return rows


def _focus_budget(report: dict[str, Any]) -> float | None:
    budgets = sorted({r["budget"] for r in report["overview"] if r["method"] == "topk"})
    if not budgets:
        return None
    return next((b for b in budgets if b >= 0.01), budgets[-1])


def _task_table(report: dict[str, Any]) -> str:
    b = _focus_budget(report)
    quality = report["meta"]["quality_tier"]
    names = ["dense", "sink-tail"] + ([f"{fam}@{b:g}" for fam in FAMILIES] if b is not None else [])
    acc = {(r["task"], r["length"], r["variant"]): r["accuracy"] for r in report["rows"] if r["tier"] == quality}
    keys = sorted({(r["length"], r["task"]) for r in report["rows"]})
    rows = [[task, str(length), *[_f(acc.get((task, length, n)), 2) for n in names]] for length, task in keys]
    return _md_table(["task", "length", *names], rows)


def _head_table(report: dict[str, Any]) -> str:
    b = _focus_budget(report)
    if b is None:
        return "(no topk budget)\n"
    names = [f"{fam}@{b:g}" for fam in FAMILIES]
    cell = {(h["variant"], h["layer"], h["head"]): h for h in report["heads"]}
    keys = sorted({(h["layer"], h["head"]) for h in report["heads"]})
    rows = []
    for layer, head in keys:
        ent = next((cell[n, layer, head]["entropy"] for n in names if (n, layer, head) in cell), None)
        rows.append([str(layer), str(head), _f(ent), *[_f(cell[n, layer, head]["rel_error"]) if (n, layer, head) in cell else "-" for n in names]])
    return _md_table(["layer", "head", "entropy", *names], rows)


# -- plots ---------------------------------------------------------------------------------------

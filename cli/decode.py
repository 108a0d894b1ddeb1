"""``generate``, ``prefill`` and ``ask``: the commands that prefill and decode."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import typer

from .errors import user_errors_exit_2
from .options import (
    AS_JSON, BUDGET, CACHE_MB, DEVICE, ESTIMATOR, FEATURES, MAPS, MAX_NEW, METHOD, MODEL, OVERWRITE, SEED, SELECTOR, SINK, STOP, TAIL,
    TEMPERATURE, TOP_P, TRUST, WAIT, EstimatorName, MethodName, OffloadName, SelectorName, cache_bytes, check_text_file, engine_config,
    store_location, note, quiet_transformers, read_text, stream,
)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(prefill)
    app.command()(ask)


@user_errors_exit_2
def generate(
    prompt: str = typer.Argument(None, help="The prompt (default: the embedded long document and question)."),
    prompt_file: Path = typer.Option(None, "--prompt-file", help="Read the prompt from this file."),
    model: str = MODEL,
    offload: OffloadName = typer.Option(OffloadName.cpu, "--offload", help="Where the mid-region KV lives."),
    store: str = typer.Option(None, "--store", callback=store_location, help="Persist the prefill there (a new or empty folder, or an s3://bucket/prefix URL), to reopen with `ask`."),
    overwrite: bool = OVERWRITE,
    wait: bool = WAIT,
    method: MethodName = METHOD,
    budget: float = BUDGET,
    max_new_tokens: int = MAX_NEW,
    as_json: bool = AS_JSON,
    sink: int = SINK,
    tail: int = TAIL,
    estimator: EstimatorName = ESTIMATOR,
    features: int = FEATURES,
    maps: Path = MAPS,
    selector: SelectorName = SELECTOR,
    cache_mb: int = CACHE_MB,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    stop: list[str] = STOP,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Prefill a prompt and continue it, reading the offloaded KV cache through the chosen method."""
    import rcengine

    if prompt is not None and prompt_file is not None:
        raise ValueError("give a prompt or --prompt-file, not both")
    if prompt_file is not None:
        check_text_file(prompt_file)
    elif prompt is not None and not prompt.strip():
        raise ValueError("the prompt is empty")
    if overwrite and store is None:
        raise ValueError("--overwrite is for --store")
    sampling = rcengine.SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
    quiet_transformers()
    cfg = engine_config(method, budget, offload, sink, tail, estimator, features, selector, maps, cache_mb)
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code, log=note)
    if prompt_file is not None:
        text = read_text(prompt_file, engine.max_text_bytes())
    elif prompt is not None:
        text = prompt
    else:
        demo = rcengine.demo_prompt(engine.lm.name)
        text = demo.prompt
        if not stop:
            sampling = dataclasses.replace(sampling, stop=demo.stop)
        typer.echo(f"[embedded demo: {len(demo.document)} characters of text, then: {demo.question.strip().splitlines()[0]}"
                   f" (expected: {demo.answer})]", err=True)
    if store is not None:
        report_reclaimed(rcengine.reclaim_stale(store))
    elif cfg.offload == "disk":
        report_reclaimed(rcengine.reclaim_stale_scratch(cfg.scratch_dir))
    answer = engine.generate(text, sampling, on_text=stream(as_json), store=store, overwrite=overwrite, wait=wait)
    finish(answer, as_json)


@user_errors_exit_2
def prefill(
    file: Path = typer.Argument(..., help="The document, a UTF-8 text file."),
    store: str = typer.Option(..., "--store", callback=store_location, help="Folder to persist the prefill in, or an s3://bucket/prefix URL (AWS_ENDPOINT_URL for a non-AWS server)."),
    model: str = MODEL,
    sink: int = SINK,
    tail: int = TAIL,
    estimator: EstimatorName = ESTIMATOR,
    features: int = FEATURES,
    maps: Path = MAPS,
    overwrite: bool = OVERWRITE,
    wait: bool = WAIT,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Prefill a document once and persist it; ask it questions later with `rcengine ask`."""
    import rcengine

    check_text_file(file)
    quiet_transformers()
    cfg = engine_config(MethodName.rc, 0.02, OffloadName.disk, sink, tail, estimator, features, maps=maps)
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code, log=note)
    text = read_text(file, engine.max_text_bytes())
    report_reclaimed(rcengine.reclaim_stale(store))
    doc = engine.prefill(text, store=store, overwrite=overwrite, wait=wait)
    typer.echo(json.dumps({"store": str(store), "tokens": doc.tokens, "prefill_ms": round(doc.prefill_ms, 1)}))
    doc.close()


def report_reclaimed(reclaimed: list) -> None:
    """One line per stale temporary folder removed (beside a store, or a scratch store), or old
    store put back."""
    for t in reclaimed:
        if t.restored:
            typer.echo(f"[put back {t.path} as the store: a replacement of it was interrupted]", err=True)
        else:
            typer.echo(f"[removed {t.path} ({t.bytes / 1e6:.1f} MB), left by an interrupted run]", err=True)


@user_errors_exit_2
def ask(
    store: str = typer.Argument(..., callback=store_location, help="A store made by `rcengine prefill` (or generate --store): a folder or an s3:// URL."),
    questions: list[str] = typer.Argument(None, help="The question, appended to the document as it is; several are answered together."),
    questions_file: Path = typer.Option(None, "--questions-file", help="Read the questions from this file, one a line (blank lines skipped)."),
    model: str = MODEL,
    method: MethodName = METHOD,
    budget: float = BUDGET,
    max_new_tokens: int = MAX_NEW,
    as_json: bool = AS_JSON,
    offload: OffloadName = typer.Option(OffloadName.disk, "--offload", help="disk reads the store; cpu/device copy it in."),
    selector: SelectorName = SELECTOR,
    cache_mb: int = CACHE_MB,
    temperature: float = TEMPERATURE,
    top_p: float = TOP_P,
    seed: int = SEED,
    stop: list[str] = STOP,
    device: str = DEVICE,
    trust_remote_code: bool = TRUST,
) -> None:
    """Answer questions about a persisted document, without recomputing its prefill.  Several
    questions (or --questions-file) are decoded together, their answers printed in order (JSON
    lines with --json)."""
    import rcengine

    if questions and questions_file is not None:
        raise ValueError("give questions or --questions-file, not both")
    asked = read_questions(questions_file) if questions_file is not None else list(questions or ())
    if not asked:
        raise ValueError("give a question (or several), or --questions-file with one question a line")
    empty = next((i for i, q in enumerate(asked) if not q.strip()), None)
    if empty is not None:
        raise ValueError("the question is empty" if len(asked) == 1 else f"question {empty + 1} is empty")
    quiet_transformers()
    cfg = rcengine.EngineConfig(method=method.value, budget=budget, selector=selector.value, **cache_bytes(cache_mb))
    engine = rcengine.Engine.load(model, cfg, device=device, trust_remote_code=trust_remote_code, log=note)
    sampling = rcengine.SamplingConfig(max_new_tokens, temperature, top_p, seed, tuple(stop or ()))
    with engine.open(store, offload=offload.value) as doc:
        if len(asked) == 1 and questions_file is None:
            answer = doc.ask(asked[0], sampling, on_text=stream(as_json))
            finish(answer, as_json)
            return
        answers = doc.ask_many(asked, sampling)
    finish_many(asked, answers, as_json)


# A questions file is read whole before the model loads; this bounds it.
QUESTIONS_FILE_BYTES = 1 << 20


def read_questions(path: Path) -> list[str]:
    """One question a line of a UTF-8 text file, blank lines skipped."""
    check_text_file(path)
    with open(path, "rb") as f:
        data = f.read(QUESTIONS_FILE_BYTES + 1)
    if len(data) > QUESTIONS_FILE_BYTES:
        raise ValueError(f"{path} is over {QUESTIONS_FILE_BYTES >> 20} MiB: a questions file holds one question a line")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8, one question a line") from None
    asked = [line.strip() for line in text.splitlines() if line.strip()]
    if not asked:
        raise ValueError(f"{path} holds no questions: write one question a line")
    return asked


def finish_many(questions: list[str], answers: list[Any], as_json: bool) -> None:
    """Each answer after its question on stdout (or a JSON line each), then a one-line summary of
    the batch on stderr."""
    for i, (q, a) in enumerate(zip(questions, answers)):
        if as_json:
            line = answer_json(a)
            line["stats"] = {k: v for k, v in a.stats.items() if k != "batch"}
            typer.echo(json.dumps({"index": i, "question": q, **line}))
        else:
            typer.echo(f"Q: {q}\nA: {a.text.strip()}\n")
    b = answers[0].stats["batch"]
    s = answers[0].stats
    budget = f", budget {s['budget']:g}" if s["budget"] is not None else ""
    rate = b["tokens_per_s"]
    typer.echo(
        f"[{b['answers']} answers, {b['new_tokens']} new tokens in {b['decode_steps'] + 1} steps, {s['method']} on {s['offload']}{budget}: "
        f"{b['bytes']['logical'] / 1e6:.2f} MB asked for, {b['bytes']['physical'] / 1e6:.2f} MB moved (read once for all), "
        f"{'-' if rate is None else f'{rate:.1f}'} tokens/s]",
        err=True,
    )


def answer_json(answer: Any) -> dict[str, Any]:
    s = answer.stats
    return {
        "text": answer.text, "prompt_tokens": answer.prompt_tokens, "new_tokens": answer.new_tokens,
        "method": s["method"], "offload": s["offload"], "budget": s["budget"],
        "bytes": {"logical": s["bytes"]["logical"], "physical": s["bytes"]["physical"], "by_tier": s["bytes"]["by_tier"],
                  "index": s["bytes"]["index"]},
        "decode_ms_per_token": s["timings_ms"]["decode_per_token"], "stats": s,
    }


def finish(answer: Any, as_json: bool) -> None:
    """The answer's JSON on stdout, or (after streamed text) a one-line summary on stderr."""
    if as_json:
        typer.echo(json.dumps(answer_json(answer)))
        return
    typer.echo("")
    s = answer.stats
    ms = s["timings_ms"]["decode_per_token"]
    budget = f", budget {s['budget']:g}" if s["budget"] is not None else ""
    typer.echo(
        f"[{answer.prompt_tokens} prompt + {answer.new_tokens} new tokens, {s['method']} on {s['offload']}{budget}: "
        f"{s['bytes']['logical'] / 1e6:.2f} MB read ({s['bytes']['physical'] / 1e6:.2f} MB moved), "
        f"{'-' if ms is None else f'{ms:.1f}'} ms/token]",
        err=True,
    )

"""Batched decode: several questions of one document (``Document.ask_many``) and several documents
(``Engine.generate_many``) decoded together give what one-at-a-time decoding gives, read the
document's selected rows once for all questions, and leave the document as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_run import rc
from conftest import logit_tolerance
from rcengine.engine.config import EngineConfig
from rcengine.engine.decode.lanes import Lanes
from rcengine.engine.decode.layer import union_read
from rcengine.engine.decode.tail import TailRing
from rcengine.engine.qa.engine import Engine
from rcengine.engine.sampling import SamplingConfig
from tiny_models import save_tiny_model

DOC_LEN = 600


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("batch") / "llama", "llama")


def _ids(seed: int, n: int) -> list[int]:
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _engine(path: Path, **kw) -> Engine:
    """float32 on every device: the tests compare greedy tokens decoded two ways, which bfloat16's
    rounding of near-ties would make differ on the GPU."""
    base = {"sink": 4, "tail": 16, "spill": 4, "budget": 0.05}
    return Engine.load(path, EngineConfig(**(base | kw)), dtype=torch.float32, show_progress=False)


QUESTIONS = [_ids(8, 9), _ids(9, 4), _ids(10, 15), _ids(11, 1)]


def test_tail_lanes_see_the_document_and_themselves_only():
    tail = TailRing(1, 1, 2, torch.float32, "cpu", 12)
    tail.append(torch.zeros(1, 1, 1, 3, 2), torch.zeros(1, 1, 1, 3, 2), torch.tensor([10, 11, 12]))
    lanes = Lanes(tail, [3, 2])
    a, b = lanes.take(0, 2), lanes.take(1, 2)
    assert a == [3, 4] and b == [6, 7] and tail.n == 8
    tail.pos[a + b] = torch.tensor([13, 14, 13, 14])
    tail.lane[a + b] = torch.tensor([0, 0, 1, 1])
    seen = tail.visible(torch.tensor([13, 14]), torch.tensor([1, 0]))[:, 0]
    assert seen[0].nonzero().flatten().tolist() == [0, 1, 2, 6]  # lane 1 at 13: the document and its own 13
    assert seen[1].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]  # lane 0 at 14
    with pytest.raises(RuntimeError, match="lane 0 holds 3"):
        lanes.take(0, 2)
    tail.truncate(3)
    assert tail.n == 3 and (tail.lane == -1).all() and (tail.pos[3:] == -1).all()


def test_union_read_reads_each_distinct_row_once(gen):
    rows = torch.randn(50, 6, generator=gen)
    for m in (1, 7, 40, 120):
        flat = torch.randint(0, 45, (m,), generator=gen)
        got, count = union_read(rows, flat, 45)
        assert torch.equal(got, rows[flat])  # a full read, in the order asked
        assert int(count) == flat.unique().numel()


@pytest.mark.parametrize("method,offload,selector", [
    ("rc", "cpu", "exact"), ("topk", "cpu", "block"), ("dense", "cpu", "exact"), ("rc", "disk", "exact"),
    ("rc", "disk", "faiss"), ("sink-tail", "cpu", "exact"),
])
def test_lane_logits_match_each_question_alone(model, method, offload, selector):
    """Every position's logits of every question, decoded in one step of several lanes, against the
    same question teacher-forced alone."""
    engine = _engine(model, method=method, offload=offload, selector=selector)
    with engine.prefill(_ids(7, DOC_LEN)) as doc:
        alone = [doc.logits(q) for q in QUESTIONS]
        st = doc.state
        n = st.tail.n
        st.tail.reserve(n + 64)
        lanes = Lanes(st.tail, [len(q) for q in QUESTIONS])
        ids, positions, slots, owners = [], [], [], []
        for b, q in enumerate(QUESTIONS):
            ids += q
            positions += range(DOC_LEN, DOC_LEN + len(q))
            slots += lanes.take(b, len(q))
            owners += [b] * len(q)
        with torch.no_grad():
            got = doc.runner.run_lanes(ids, positions, slots, owners, list(range(len(ids))))
        st.tail.truncate(n)
    tol = logit_tolerance(engine.lm.dtype)
    start = 0
    for q, ref in zip(QUESTIONS, alone):
        torch.testing.assert_close(got[start : start + len(q)], ref, atol=tol, rtol=tol)
        start += len(q)


@pytest.mark.parametrize("method,offload", [("rc", "cpu"), ("topk", "cpu"), ("dense", "cpu"), ("rc", "disk")])
def test_ask_many_answers_as_one_at_a_time(model, method, offload):
    engine = _engine(model, method=method, offload=offload)
    sampling = SamplingConfig(max_new_tokens=12)
    with engine.prefill(_ids(7, DOC_LEN)) as doc:
        alone = [doc.ask(q, sampling) for q in QUESTIONS]
        rows, tail = doc.state.mid_len, doc.state.tail.n
        together = doc.ask_many(QUESTIONS, sampling)
        assert (doc.state.mid_len, doc.state.tail.n) == (rows, tail)  # nothing spilled, nothing left
        assert (doc.state.tail.lane == -1).all()
        assert doc.ask(QUESTIONS[0], sampling).token_ids == alone[0].token_ids
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert [a.text for a in together] == [a.text for a in alone]
    for a, b in zip(together, alone):
        # each question asks for as many rows as alone: its share of the batch's logical bytes is its own
        assert a.stats["bytes"]["logical"] == b.stats["bytes"]["logical"]
        assert a.prompt_tokens == b.prompt_tokens and a.stats["queries"] == b.stats["queries"]
    batch = together[0].stats["batch"]
    assert batch is together[-1].stats["batch"]
    assert batch["bytes"]["logical"] == sum(a.stats["bytes"]["logical"] for a in alone)
    assert sum(s["logical"] for s in batch["per_step"]) == batch["bytes"]["logical"]
    assert batch["per_step"][0]["answers"] == len(QUESTIONS)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_padded_steps_answer_and_read_as_unpadded(model, offload):
    """Decode steps padded to bucket sizes (what captured steps run: copies of the first token in a
    lane no answer sees) give the same answers, and the padding reads and meters nothing."""
    sampling = SamplingConfig(max_new_tokens=10, ignore_eos=True)
    questions = QUESTIONS[:3]  # 3 answers: steps of 4 queries
    runs = {}
    for padded in (False, True):
        engine = _engine(model, method="rc", offload=offload)
        with engine.prefill(_ids(7, DOC_LEN)) as doc:
            doc.runner.capture_lanes = False  # padded or not as the test says, on every device
            doc.runner.pad_lanes = padded
            calls = []
            run_lanes = doc.runner.run_lanes
            doc.runner.run_lanes = lambda ids, *a, **kw: calls.append(len(ids)) or run_lanes(ids, *a, **kw)
            runs[padded] = (doc.ask_many(questions, sampling), calls)
    (plain, plain_calls), (padded, padded_calls) = runs[False], runs[True]
    assert plain_calls[1:] == [3] * 9 and padded_calls[1:] == [4] * 9
    assert [a.token_ids for a in padded] == [a.token_ids for a in plain]
    steps = lambda answers: [(s["logical"], s["physical"]) for s in answers[0].stats["batch"]["per_step"]]  # noqa: E731
    assert steps(padded) == steps(plain)


def test_each_answer_stops_on_its_own(model):
    """A stop string that ends one answer early ends only that one, as it would alone; seeded
    sampling draws what each question draws alone."""
    engine = _engine(model, method="rc")
    with engine.prefill(_ids(7, DOC_LEN)) as doc:
        free = doc.ask(QUESTIONS[0], SamplingConfig(max_new_tokens=12))
        stop = engine.lm.tokenizer.decode(free.token_ids[3:5])
        results = []
        for sampling in (SamplingConfig(max_new_tokens=12, stop=(stop,)), SamplingConfig(max_new_tokens=12, temperature=0.9, seed=5)):
            alone = [doc.ask(q, sampling) for q in QUESTIONS]
            together = doc.ask_many(QUESTIONS, sampling)
            assert [(a.token_ids, a.text) for a in together] == [(a.token_ids, a.text) for a in alone]
            results.append(together)
    stopped = results[0]
    assert len(stopped[0].token_ids) < 12 and stop not in stopped[0].text  # cut by the stop string
    steps = stopped[0].stats["batch"]["per_step"]
    assert max(len(a.token_ids) for a in stopped) == 12  # another went on after it stopped
    assert steps[-1]["answers"] < len(QUESTIONS)


def test_the_union_of_selected_rows_is_read_once(model):
    """Two copies of one question select the same rows: the batch moves what one moves, and asks for
    twice as much.  Dense reads every row once per step whatever the number of questions."""
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    for method in ("rc", "dense"):
        engine = _engine(model, method=method, offload="cpu")
        with engine.prefill(_ids(7, DOC_LEN)) as doc:
            doc.runner.use_graphs = False  # exact plans on every device (a captured plan reads padding for spills to come)
            one = doc.ask(QUESTIONS[2], sampling)
            two = doc.ask_many([QUESTIONS[2], QUESTIONS[2]], sampling)
            mid = doc.state.mid_len
        batch = two[0].stats["batch"]
        layout = engine._layout()
        per_step = one.stats["bytes_per_decode_step"]["by_tier"]["cpu"]
        for step in batch["per_step"][1:]:
            assert step["answers"] == 2
            assert step["logical"] == pytest.approx(2 * per_step["logical"])
            assert step["physical"] == pytest.approx(per_step["physical"])
        if method == "dense":
            once = layout.num_layers * layout.num_kv_heads * mid * layout.row_bytes
            assert all(step["physical"] == once for step in batch["per_step"])
        assert two[0].token_ids == two[1].token_ids == one.token_ids


def test_different_questions_share_what_they_both_select(model):
    sampling = SamplingConfig(max_new_tokens=8, ignore_eos=True)
    engine = _engine(model, method="rc", offload="cpu")
    with engine.prefill(_ids(7, DOC_LEN)) as doc:
        doc.runner.use_graphs = False  # exact plans on every device (a captured plan reads padding for spills to come)
        together = doc.ask_many(QUESTIONS, sampling)
    for step in together[0].stats["batch"]["per_step"]:
        assert step["logical"] / step["answers"] <= step["physical"] <= step["logical"]


@pytest.mark.parametrize("method,offload", [("rc", "cpu"), ("dense", "cpu"), ("rc", "disk"), ("topk", "disk")])
def test_generate_many_continues_each_prompt_as_alone(model, method, offload):
    """Three documents of different lengths decoded in one forward per step, past several spills."""
    engine = _engine(model, method=method, offload=offload)
    prompts = [_ids(12, 500), _ids(13, 300), _ids(14, 650)]
    for sampling in (SamplingConfig(max_new_tokens=30, ignore_eos=True), SamplingConfig(max_new_tokens=20, temperature=0.8, seed=3)):
        alone = [engine.generate(p, sampling) for p in prompts]
        together = engine.generate_many(prompts, sampling)
        assert [a.token_ids for a in together] == [a.token_ids for a in alone]
        for a, b in zip(together, alone):
            assert a.stats["bytes"]["logical"] == b.stats["bytes"]["logical"]
            # Moved: as alone, or less where alone ran captured steps (whose plans read padding for spills to come).
            if engine.lm.device.type == "cpu":
                assert a.stats["bytes"]["physical"] == b.stats["bytes"]["physical"]
            assert a.stats["bytes"]["physical"] <= b.stats["bytes"]["physical"]
        assert together[0].stats["batch"]["answers"] == 3


def test_batched_calls_refuse_bad_input(model):
    engine = _engine(model, method="rc")
    with engine.prefill(_ids(7, 200)) as doc:
        with pytest.raises(TypeError, match="list of questions"):
            doc.ask_many("one question")
        with pytest.raises(ValueError, match="questions is empty"):
            doc.ask_many([])
        with pytest.raises(ValueError, match="question 2 is empty"):
            doc.ask_many(["fine", "  "])
        with pytest.raises(ValueError, match="question 1 holds token id"):
            doc.ask_many([[10**6]])
    with pytest.raises(TypeError, match="list of prompts"):
        engine.generate_many("one prompt")
    with pytest.raises(ValueError, match="prompt 2 is empty"):
        engine.generate_many(["fine", ""])


def test_cli_asks_several_questions(model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("Rivers run to the sea, and the sea is never full. " * 12)
    store = str(tmp_path / "store")
    assert rc("prefill", str(doc), "--store", store, "--model", str(model), "--tail", "16").returncode == 0
    common = ("--model", str(model), "--max-new-tokens", "4", "--json")
    one = [json.loads(rc("ask", store, q, *common).stdout) for q in (" What?", " Where?")]
    both = rc("ask", store, " What?", " Where?", *common)
    assert both.returncode == 0, both.stderr
    lines = [json.loads(line) for line in both.stdout.splitlines()]
    assert [x["question"] for x in lines] == [" What?", " Where?"] and [x["index"] for x in lines] == [0, 1]
    assert [x["text"] for x in lines] == [x["text"] for x in one]
    assert "2 answers" in both.stderr and "read once" in both.stderr
    (tmp_path / "q.txt").write_text("What?\n\n  Where?  \n")
    filed = rc("ask", store, "--questions-file", str(tmp_path / "q.txt"), "--model", str(model), "--max-new-tokens", "4")
    assert filed.returncode == 0, filed.stderr
    assert filed.stdout.count("Q: ") == 2 and "Q: Where?" in filed.stdout


def test_cli_questions_bad_input(model, tmp_path):
    store = str(tmp_path / "none")

    def one_line(out, fragment: str) -> None:  # noqa: ANN001
        assert out.returncode == 2, (out.returncode, out.stderr)
        assert fragment in out.stderr and "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr

    one_line(rc("ask", store, "--model", str(model)), "give a question")
    (tmp_path / "q.txt").write_text("a\n")
    one_line(rc("ask", store, "x", "--questions-file", str(tmp_path / "q.txt"), "--model", str(model)), "not both")
    (tmp_path / "blank.txt").write_text("\n  \n")
    one_line(rc("ask", store, "--questions-file", str(tmp_path / "blank.txt"), "--model", str(model)), "holds no questions")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9?\n")
    one_line(rc("ask", store, "--questions-file", str(tmp_path / "latin1.txt"), "--model", str(model)), "not UTF-8")
    one_line(rc("ask", store, "--questions-file", str(tmp_path / "missing.txt"), "--model", str(model)), "does not exist")
    one_line(rc("ask", store, "x", " ", "--model", str(model)), "question 2 is empty")

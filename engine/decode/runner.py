"""Running forward steps over a :class:`~.state.KVState`: plan, inputs, CUDA graphs, metering,
spills.

Per step: the plan (reused while it covers the mid-region and no buffer changed), the inputs
written with one host-to-device copy, the forward (eager, or a replayed CUDA graph for single-token
steps on CUDA), then host bookkeeping: the tail's count, the meter (the bytes a device-read step
moved are known from its plan, so nothing is read back), and a spill when the tail is full.

``forward(ids, positions, keep)`` is the model call (the transformers seam supplies it):
``ids, positions: (1, T)`` on the device -> logits float32: ``(1, vocab)`` of the last position
(``keep`` False), ``(1, T, vocab)`` of every position (True), or ``(1, K, vocab)`` of the positions
in ``keep: (K,)`` (a tensor: the last token of each sequence in a step of several).

:meth:`StepRunner.run_lanes` runs a step of several sequences that share the document (batched
questions, :mod:`.lanes`): each token attends to the document and its own sequence's tail slots,
and the rows its queries select are read once for all of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch

from ...storage import Counters
from .plan import DecodePlan, StepInputs
from .state import KVState

Forward = Callable[[torch.Tensor, torch.Tensor, "bool | torch.Tensor"], torch.Tensor]
# Captured graphs kept per document (one per plan; a new plan is made every PLAN_HORIZON spilled
# tokens or when a buffer grows, so two cover a plan change without recapturing back and forth;
# batched steps add one per batch-size bucket).
MAX_GRAPHS = 8
# Warm-up runs before a capture (cuBLAS handles, allocator pools); a step's writes are idempotent.
WARMUP_RUNS = 2


class StepRunner:
    def __init__(self, state: KVState, forward: Forward, use_graphs: bool) -> None:
        self.state = state
        self.forward = forward
        self.use_graphs = use_graphs and state.device.type == "cuda"
        self._plans: dict[tuple[int, bool], DecodePlan] = {}  # captured plans, by (queries, lanes)
        self._inputs: dict[int, StepInputs] = {}
        # Per plan and inputs: the graph, its logits, and the union counts it writes (steps of several sequences).
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self._pool = None
        self.captures = 0  # graphs captured so far (for the benchmarks)
        self.reruns = 0  # steps run again after reading blocks they missed (disk tier)
        # Eager steps on the disk tier look blocks up as captured ones do and fill misses between
        # runs (as a graph must), instead of layer by layer: for tests of that path on any machine.
        self.defer_fills = False
        self._in_place = False  # the running step reads the disk tier's block cache in place
        # Steps of several sequences padded to bucket sizes as captured ones are, without capturing:
        # for tests of that path on any machine.
        self.pad_lanes = False
        # Steps of several sequences as CUDA graphs: questions of the document, one per batch-size
        # bucket (16 questions at 32K on the H200: 6.1x one at a time captured, 2.7x eager;
        # bench/RESULTS.md); a group of documents whose runner this is (generate_many), per set.
        self.capture_lanes = True

    def run(self, ids: list[int], start: int, every_position: bool = False) -> torch.Tensor:
        """One forward over ``ids`` (the next T tokens, at positions ``start..``) -> logits."""
        t = len(ids)
        captured = t == 1 and not every_position and self.can_capture()
        inputs = self.begin(ids, start, every_position, captured)
        logits = self._execute(inputs, every_position, captured)
        self._account(t, start)
        return logits

    def can_capture(self, queries: int = 1) -> bool:
        """Whether a step of ``queries`` tokens may run as a CUDA graph: graphs are on, no probe is
        set, and the step runs on the device alone (:meth:`KVState.graph_safe`)."""
        return self.use_graphs and self.state.probe is None and self.state.graph_safe(queries)

    def _execute(self, inputs: StepInputs, keep: bool | torch.Tensor, captured: bool) -> torch.Tensor:
        """The set-up step's forward: its graph replayed (``captured``) or run eagerly; then, on the
        disk tier's block cache, the missing blocks read and the step run again until it finds
        them all."""
        if captured:
            graph, logits = self._graph(self.state.plan, inputs, keep)
            graph.replay()
        else:
            logits = self._step(inputs, keep)
        if self._in_place:
            rerun = self._fill_and_rerun(graph.replay if captured else lambda: self._step(inputs, keep))
            if rerun is not None and not captured:
                logits = rerun
        return logits

    def begin(self, ids: list[int], start: int, every_position: bool = False, captured: bool = False,
              deferrable: bool = True) -> StepInputs:
        """A step's set-up before its forward: plan, inputs, the block cache's step.  A step of a
        group of documents (one forward for all, :func:`~rcengine.engine.hf.integration.group_forward`)
        calls this (not ``deferrable``: it cannot run again), :meth:`prelude`, the forward, then
        :meth:`end` for each document."""
        st = self.state
        t = len(ids)
        st.tail.reserve(st.tail.n + t)
        inputs = self._prepare(t, every_position, captured, False, deferrable)
        inputs.fill(torch.tensor(ids, dtype=torch.int64)[None], start, st.tail.slots_for(t))
        return inputs

    def _prepare(self, t: int, every_position: bool, captured: bool, lanes: bool, deferrable: bool = True) -> StepInputs:
        """The plan and inputs of a step of ``t`` tokens, made the running step's; the block cache's
        step begun (a captured or deferrable one only flags the blocks it misses)."""
        st = self.state
        plan = self._plan_for(t, every_position, captured, lanes)
        inputs = self._inputs.setdefault(t, StepInputs(t, st.device))
        st.plan, st.step = plan, inputs
        self._in_place = bool(plan.rows) and st.reads_blocks_in_place()
        if self._in_place:
            st.tier.begin_step()
            st.tier.cache.deferred = captured or (self.defer_fills and deferrable)
        return inputs

    def end(self, t: int, start: int) -> None:
        """After the forward of a step set up by :meth:`begin` (not deferred): finish the block
        cache's step, then :meth:`_account`."""
        if self._in_place:
            self._fill_and_rerun(lambda: None)
        self._account(t, start)

    def _account(self, t: int, start: int) -> None:
        """A step's bookkeeping: the tail's count, the meter, a spill."""
        st = self.state
        st.tail.n += t
        st.seen = start + t
        self._meter(st.plan)
        st.spill_if_full(new=t)

    def run_lanes(self, ids: list[int], positions: list[int], slots: list[int], lanes: list[int], keep: list[int] | None = None,
                  real: int | None = None) -> torch.Tensor:
        """One forward over the tokens of several sequences sharing the document: token ``i`` of
        lane ``lanes[i]`` at ``positions[i]``, written to tail slot ``slots[i]`` (the caller owns the
        slots: nothing spills) -> logits float32 ``(len(keep), vocab)`` after the tokens ``keep``,
        or ``(T, vocab)`` after each (``keep`` None: a decode step, captured as a CUDA graph per
        query count where the device allows).  ``real``: tokens that are answers' (the first ones;
        the rest pad the step to its captured shape and are not metered).  A captured step's
        logits are its graph's output: read them before the next step."""
        st = self.state
        t = len(ids)
        captured = keep is None and self.capture_lanes and self.can_capture(t)
        inputs = self._prepare(t, False, captured, True)
        inputs.fill_lanes(ids, positions, slots, lanes)
        rows = True if keep is None else torch.tensor(keep, dtype=torch.int64, device=st.device)
        logits = self._execute(inputs, rows, captured)
        self._meter(st.plan, t if real is None else real)
        return logits[0]

    @property
    def pads_lanes(self) -> bool:
        """Whether decode steps of several sequences are padded to :func:`~.lanes.bucket` sizes
        (their shapes captured once each), or run at their own size."""
        return (self.capture_lanes and self.use_graphs and self.state.graph_safe()) or self.pad_lanes

    def _step(self, inputs: StepInputs, keep: bool | torch.Tensor) -> torch.Tensor:
        """What a step runs on the device (and what a graph captures)."""
        self.prelude(inputs)
        return self.forward(inputs.ids, inputs.positions, keep)

    def prelude(self, inputs: StepInputs) -> None:
        """The device work of a step before its forward: the new tokens' tail positions (and lanes)."""
        st = self.state
        if self._in_place:
            st.tier.cache.begin_step()
        st.tail.pos.index_copy_(0, inputs.slots, inputs.q_pos)
        if st.plan.lanes:
            st.tail.lane.index_copy_(0, inputs.slots, inputs.lanes)

    def _fill_and_rerun(self, rerun: Callable[[], torch.Tensor | None]) -> torch.Tensor | None:
        """After a deferred run (its blocks looked up, the missing ones flagged): read the missing
        blocks and run the step again, until a run finds every block it needs.  Each run is
        exact for the layers up to its first missing block, so this ends within L + 1 runs
        (a warm cache: one).  Then meter the cache hits.  -> what the last rerun returned (None
        without one)."""
        st = self.state
        tier = st.tier
        last = None
        try:
            if tier.cache.deferred:
                for _ in range(st.num_layers + 1):
                    if not tier.fill_missed():
                        break
                    last = rerun()
                    self.reruns += 1
                else:
                    raise RuntimeError("the disk tier's block cache kept missing blocks for one step: raise cache_bytes")
            tier.finish_step()
        finally:
            tier.cache.deferred = False
        return last

    def _plan_for(self, queries: int, every_position: bool, captured: bool, lanes: bool = False) -> DecodePlan:
        st = self.state
        p = self._plans.get((queries, lanes))
        n = st.mid_len
        if (captured and p is not None and not p.every_position and p.covers(n) and p.method == st.method
                and p.budget == st.config.budget and p.fused == st.config.fused and p.version == st.buffers_version()):
            return p
        plan = st.make_plan(queries, every_position, captured, lanes)
        if captured:
            self._plans[queries, lanes] = plan
        return plan

    def _graph(self, plan: DecodePlan, inputs: StepInputs, keep: bool = False) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (plan, id(inputs))
        if key in self._graphs:
            self._graphs.move_to_end(key)
            graph, logits, unions = self._graphs[key]
            self.state.union_rows = list(unions)  # the counts this graph's replays write
            return graph, logits
        while len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph, logits = capture(lambda: self._step(inputs, keep), self._pool)
        self._graphs[key] = (graph, logits, list(self.state.union_rows))
        self.captures += 1
        return graph, logits

    def _meter(self, plan: DecodePlan, queries: int | None = None) -> None:
        """Record what the step read where the device read it (host-read tiers and the FAISS
        index meter themselves): per layer, the rows the rule asked for (logical) and the rows the
        plan moved (physical), and the selection state the selector scanned."""
        st = self.state
        tier, meter = st.tier, st.meter
        layers, heads = st.num_layers, st.num_kv_heads
        t = plan.queries if queries is None else queries  # padding tokens ask for nothing
        n = st.mid_len
        if plan.rows and (self._in_place or st.device_rows(0) is not None):
            live = n if plan.method.name == "dense" else min(plan.live_units(n) * plan.block, n)
            row = tier.layout.row_bytes
            logical = heads * t * live * row
            union = torch.stack([u.to(st.device) for u in st.union_rows]).tolist() if plan.lanes else None  # after the step: one copy
            for layer in range(layers):
                if self._in_place:  # the disk tier's cache, read in place: what the fills read is metered by them
                    physical, h2d = 0, logical if st.device.type == "cuda" else 0
                else:  # several sequences: the union of their rows, read once
                    physical = (union[layer] if plan.lanes else heads * t * plan.rows) * row
                    h2d = tier.h2d(physical)
                meter.record(tier.name, layer, Counters(logical=logical, physical=physical, h2d=h2d, rows=heads * t * live, gathers=1))
        if plan.method.selects and st.selectors[0].on_device:
            nbytes = st.selectors[0].read_bytes(plan.mid_cap)
            for layer in range(layers):
                meter.record_index(layer, nbytes, plan.mid_cap * heads, tier="device")

    def drop_graphs(self) -> None:
        self._graphs.clear()
        self._plans.clear()
        self._pool = None  # the pool goes with its last graph: a capture into it after that fails in the allocator


def capture(step: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:  # noqa: ANN001 (a graph pool handle)
    """``step`` (idempotent device work over static buffers) run WARMUP_RUNS times on a side
    stream, then captured into a CUDA graph in ``pool`` -> (the graph, the output its replays write)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = step()
    return graph, out

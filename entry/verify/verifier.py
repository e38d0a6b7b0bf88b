"""Output verification at the entry, and the bookkeeping each finished generation triggers.

For every finished generation (MeshBackend's `on_generation_done`, or a canary probe):
1. cheap structural checks that need no model (a "length" finish far short of max_tokens);
2. credits are booked: each node of the failover chain gets the tokens it delivered, the last
   one only against its accepted receipt; held in escrow (entry/credits/ledger.py);
3. a sample of generations (all canaries) is queued for re-scoring: our own llama.cpp replays
   prompt + every claimed token in one prefill and entry/verify/stats.py judges each node's
   part (the parts before it are its context, exactly what the node was given);
4. verdicts settle the escrow (failed -> withheld), move reputation and may demote the node
   (entry/mesh/view.py), and are counted in metrics and shown in /v1/mesh/nodes.

Sampling: `rate` of the requests of established nodes, `new_rate` until a node has passed
`new_until` checks, `suspicious_rate` while it has fewer than `calm_after` passes per failed
check. A generation is checked if any of its nodes draws it.

Privacy: the prompt stays in this process, in memory, until its check ran; it never goes to
another node. Cost: the replay is one prefill on `n_threads` (default 1) in a worker thread
behind the engine's lock, queued, so a burst waits instead of slowing the API. The queue is
bounded in jobs (`max_queue`) and in tokens (`max_queue_tokens`, prompt + output: a long
prompt costs the verifier more, so it takes more of the budget).

Fails closed: a sampled generation whose check cannot run (no room in the queue, longer than
the verifier's context, an error) keeps its credits held as 'unchecked' until they expire
unvested (entry/credits/ledger.py), and a node still in its "new" period is not routed to
unless there is room to check its work (`admits`, router.pick's `admit`): flooding the
verifier neither pays nor lets new nodes serve unchecked.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from engine.grammar import Grammar, GrammarError, compile_grammar
from engine.llama import BadRequest, Engine
from engine.textstream import TextStream
from entry.credits.ledger import Ledger, PartCredit, model_weight
from entry.mesh.relay import GenerationRecord
from entry.verify import stats as vs

log = logging.getLogger("mesh.entry.verifier")


@dataclass
class VerifierConfig:
    rate: float = 0.15
    new_rate: float = 1.0
    new_until: int = 10
    suspicious_rate: float = 1.0
    calm_after: int = 10
    max_queue: int = 64
    max_queue_tokens: int = 32768  # prompt + output tokens of the queued checks, together
    reserve_tokens: int = 512  # what admits() sets aside for each request in flight on a new node
    n_threads: int = 1
    n_ctx: int = 4096
    # A node must accept generations of at least this many tokens: a "length" finish shorter
    # than min(max_tokens, this) with context to spare is a truncated output. (Adverts do not
    # carry a node's own --max-tokens cap, so beyond this the entry cannot tell.)
    length_floor: int = 256
    vest_interval: float = 60.0


@dataclass
class Verdict:
    request_id: str
    peer_id: str
    pseudonym: str
    model_sha256: str
    passed: bool
    reason: str
    tokens: int
    rescored: bool  # re-scored with the model (False: a structural check only)
    canary: bool = False
    max_deviation: float | None = None
    pvalue: float | None = None
    soft_violations: int = 0  # tokens deviating more than verify_stats.SOFT


@dataclass
class VerifyModel:
    engine: Engine
    sha256: str
    weight: float
    end_ids: list[int]
    name: str = ""  # the file name without .gguf: the name nodes serving this file use by default


@dataclass
class _Outcome:
    """What a re-score produced; metrics are counted from it in the trio thread (the
    registry is not thread-safe)."""

    verdicts: list[Verdict]
    seconds: float = 0.0
    tokens: int = 0
    skipped: str = ""


@dataclass
class _Job:
    record: GenerationRecord
    model: VerifyModel
    skip: set[str] = field(default_factory=set)  # peer ids already failed by a structural check
    cost: int = 0  # tokens, for the queue's budget


class Verifier:
    def __init__(self, *, view=None, ledger: Ledger | None = None, metrics=None, config: VerifierConfig | None = None,
                 rng: random.Random | None = None):
        self.view = view
        self.ledger = ledger
        self.config = config or VerifierConfig()
        self.models: dict[str, VerifyModel] = {}
        self.verdicts: deque[Verdict] = deque(maxlen=1000)  # the latest, for tests and inspection
        self._rng = rng or random.SystemRandom()
        self._send, self._recv = trio.open_memory_channel(self.config.max_queue)
        self._limiter = trio.CapacityLimiter(1)
        self._busy = 0  # jobs queued or running
        self._queued_tokens = 0  # their cost (job_cost), together
        self._idle = trio.Event()
        self._idle.set()
        self.seconds = 0.0  # spent re-scoring
        self._metrics(metrics)

    def _metrics(self, m) -> None:
        from entry.api.metrics import Metrics

        m = m or Metrics()
        self.m_checks = m.counter("mesh_verify_checks_total", "Verification verdicts by outcome and kind", ("outcome", "kind"))
        self.m_failures = m.counter("mesh_verify_failures_total", "Failed verifications by reason", ("reason",))
        self.m_skipped = m.counter("mesh_verify_skipped_total", "Sampled generations not re-scored", ("why",))
        self.m_tokens = m.counter("mesh_verify_tokens_total", "Tokens re-scored by the verifier")
        self.m_seconds = m.counter("mesh_verify_seconds_total", "Seconds spent re-scoring")
        self.m_credits = m.counter("mesh_credits_booked_total", "Credits booked (held in escrow first)")
        self.m_queue = m.gauge("mesh_verify_queue", "Generations waiting to be re-scored")
        self.m_queue.set(0)

    # -- models -------------------------------------------------------------------------------

    def load_model(self, path: str | Path) -> VerifyModel:
        """Load a GGUF to verify with (blocking: call from a thread at start)."""
        engine = Engine(path, n_ctx=self.config.n_ctx, n_threads=self.config.n_threads)
        end_ids = [t for t in range(engine.n_vocab) if engine.is_end(t)]
        model = VerifyModel(engine, engine.info.sha256, model_weight(engine.n_params), end_ids,
                            Path(path).name.removesuffix(".gguf"))
        self.models[model.sha256] = model
        log.info("verifying model", extra={"model": engine.info.name, "sha256": model.sha256[:16], "weight": round(model.weight, 4)})
        return model

    def weight(self, sha256: str) -> float:
        m = self.models.get(sha256)
        return m.weight if m is not None else model_weight(None)

    def pins(self) -> dict[str, str]:
        """{model name: sha256} of the models we verify with: those names stay theirs
        (entry/mesh/router.py build_catalog)."""
        return {m.name: m.sha256 for m in self.models.values() if m.name}

    def close(self) -> None:
        for m in self.models.values():
            m.engine.close()

    # -- sampling policy -----------------------------------------------------------------------

    def rate_for(self, node_state) -> float:
        c = self.config
        if node_state is None:
            return c.new_rate
        if node_state.verify_failed and node_state.verified < c.calm_after * node_state.verify_failed:
            return c.suspicious_rate
        if node_state.model_sha256 in node_state.demoted or node_state.model_sha256 in getattr(node_state, "probation", ()):
            return c.suspicious_rate
        if node_state.verified < c.new_until:
            return c.new_rate
        return c.rate

    def _state(self, peer_id: str):
        if self.view is None:
            return None
        return next((n for n in self.view.all_nodes() if n.peer_id == peer_id), None)

    # -- capacity -----------------------------------------------------------------------------------

    @staticmethod
    def job_cost(record: GenerationRecord) -> int:
        """Tokens a check of `record` replays. The prompt's count is the node's word, checked
        only by the replay itself, so a UTF-8 bytes / 4 floor keeps a node that understates
        it from getting a long prompt into the queue cheaply."""
        req = record.request
        chars = len(req.prompt.encode()) + sum(len(m.content.encode()) for m in req.messages)
        return max(record.prompt_tokens, chars // 4) + len(record.ids) + 1

    def _has_room(self, cost: int, reserved_jobs: int = 0, reserved_tokens: int = 0) -> bool:
        c = self.config
        return (self._busy + reserved_jobs < c.max_queue
                and self._queued_tokens + reserved_tokens + cost <= c.max_queue_tokens)

    def _checked_closely(self, node_state) -> bool:
        return node_state.model_sha256 in self.models and self.rate_for(node_state) > self.config.rate

    def admits(self, node_state) -> bool:
        """May the router send a request to this node? Always, unless every request of the node
        is checked (new, suspicious, on probation) and the queue has no room for one more
        beyond what its requests in flight will bring."""
        if not self._checked_closely(node_state):
            return True
        nodes = self.view.nodes() if self.view is not None else [node_state]
        flying = sum(n.in_flight for n in nodes if n.in_flight and self._checked_closely(n))
        c = self.config
        return self._has_room(c.reserve_tokens, flying, flying * c.reserve_tokens)

    # -- a finished generation -------------------------------------------------------------------

    def on_generation_done(self, record: GenerationRecord) -> None:
        """Book, check structure, and maybe queue a re-score. Called in the trio thread."""
        req = record.request
        model = self.models.get(req.model_sha256)
        structural = self._structural(record)
        sampled = model is not None and (record.canary or any(
            self._rng.random() < self.rate_for(self._state(p.peer_id)) for p in record.parts))
        queued = False
        unchecked = ""
        if sampled:
            queued = self._enqueue(_Job(record, model, set(structural), self.job_cost(record)))
            if not queued:
                unchecked = "queue_full"
                self.m_skipped.inc(why="queue_full")
        if self.ledger is not None:
            parts = [PartCredit(p.peer_id, len(p.ids) if (p.receipt is not None or not p.finished) else 0,
                                p.receipt.blob if p.receipt is not None else None) for p in record.parts]
            weight = self.weight(req.model_sha256)
            booked = self.ledger.book(req.request_id, req.model_sha256, parts, weight=weight, pending=queued,
                                      canary=record.canary, unchecked=unchecked)
            if booked:
                self.m_credits.inc(sum(p.tokens for p in parts) * weight)
            self._withhold_demoted_canary(record)
        for part in record.parts:
            if part.peer_id in structural:
                self._apply(record, Verdict(req.request_id, part.peer_id, part.pseudonym, req.model_sha256, False,
                                            structural[part.peer_id], len(part.ids), False, record.canary))

    def _enqueue(self, job: _Job) -> bool:
        if not self._has_room(job.cost):
            return False
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            return False
        self._busy += 1
        self._queued_tokens += job.cost
        self._idle = trio.Event() if self._idle.is_set() else self._idle
        self.m_queue.inc()
        return True

    def _withhold_demoted_canary(self, record: GenerationRecord) -> None:
        """A demoted node earns nothing from the probes that test it: passing them is its way
        back to probation, not a way to be paid while users are kept away from it."""
        if not record.canary:
            return
        for p in record.parts:
            st = self._state(p.peer_id)
            if st is not None and record.request.model_sha256 in st.demoted:
                self.ledger.settle_verification(record.request.request_id, {p.peer_id: (False, "demoted")})

    def _structural(self, record: GenerationRecord) -> dict[str, str]:
        """Failures visible without the model: {peer id: reason}."""
        req, last = record.request, record.parts[-1]
        n = len(record.ids)
        if record.finish_reason == "length":
            ctx = last.context_size or 1 << 30
            short = n < min(req.params.max_tokens, self.config.length_floor)
            if short and record.prompt_tokens + n < ctx - 1:
                return {last.peer_id: "truncated"}
        return {}

    # -- re-scoring ------------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The worker (and the vesting clock): start with `await nursery.start(verifier.run)`."""
        async with trio.open_nursery() as nursery:
            if self.ledger is not None:
                nursery.start_soon(self._vest_loop)
            task_status.started()
            async for job in self._recv:
                try:
                    outcome = await trio.to_thread.run_sync(self._check, job, limiter=self._limiter)
                except Exception:
                    log.exception("verification failed to run")
                    outcome = _Outcome([], skipped="error")
                finally:
                    self._busy -= 1
                    self._queued_tokens -= job.cost
                    self.m_queue.dec()
                verdicts = outcome.verdicts
                if outcome.skipped:
                    self.m_skipped.inc(why=outcome.skipped)
                self.seconds += outcome.seconds
                self.m_seconds.inc(outcome.seconds)
                self.m_tokens.inc(outcome.tokens)
                for v in verdicts:
                    self._apply(job.record, v)
                if not verdicts and self.ledger is not None:
                    # Fail closed: held, then withheld at vesting time (ledger module doc).
                    self.ledger.mark_unchecked(job.record.request.request_id, outcome.skipped or "no_verdict")
                if self._busy == 0:
                    self._idle.set()

    async def _vest_loop(self) -> None:
        while True:
            try:
                self.ledger.vest_due()
                self.ledger.expire_unchecked()
            except Exception:
                log.exception("vesting failed")
            await trio.sleep(self.config.vest_interval)

    async def wait_idle(self, timeout: float) -> bool:
        """Until every queued check ran (tests, shutdown); False on timeout."""
        with trio.move_on_after(timeout):
            while self._busy:
                await self._idle.wait()
            return True
        return False

    def check(self, record: GenerationRecord) -> list[Verdict]:
        """Re-score a record now, in this thread (benchmarks and tests; no bookkeeping)."""
        return self._check(_Job(record, self.models[record.request.model_sha256])).verdicts

    def _check(self, job: _Job) -> _Outcome:
        """Blocking: runs in a worker thread."""
        t0 = time.perf_counter()
        rec, model = job.record, job.model
        eng, req, params = model.engine, rec.request, rec.request.params
        ids = rec.ids
        n = len(ids)
        try:
            prompt = eng.prompt_tokens(req)
            if len(prompt) + n + 1 > eng.n_ctx:
                raise BadRequest("longer than the verifier's context")
        except BadRequest as e:
            log.info("generation cannot be verified here", extra={"request": req.request_id, "why": str(e)[:100]})
            return _Outcome([], skipped="too_long")
        if params.temperature > 0 and params.seed is None:
            return _Outcome([], skipped="no_seed")  # cannot happen: build_request always sets one
        u = vs.draws(params.seed, n + 1) if params.temperature > 0 else None
        checkers, owner, start = [], [], 0
        for k, part in enumerate(rec.parts):
            checkers.append(vs.PartChecker(params, prompt + ids[:start], u, start))
            owner += [k] * len(part.ids)
            start += len(part.ids)
        end_row: dict[str, float] = {}
        grammar: Grammar | None = None
        if req.grammar:
            try:
                grammar = compile_grammar(eng, req.grammar)
            except GrammarError:
                return _Outcome([], skipped="bad_grammar")  # a node refuses it too: nothing was generated
        broke: dict[int, int] = {}  # part -> index of its first token the grammar forbids

        def consume(i: int, row) -> None:
            # Under a grammar the node sampled from the masked row: so do we. After a forbidden
            # token the grammar has no state to go on; that part has failed anyway.
            if grammar is not None and not broke and (i < n or rec.finish_reason == "stop"):
                if i < n and not grammar.allows(ids[i]):
                    broke[owner[i]] = i
                else:
                    try:
                        row = grammar.mask(row)
                    except GrammarError:  # nothing may follow (not even an end)
                        broke[owner[min(i, n - 1)]] = i
                    if i < n:
                        grammar.accept(ids[i])
            if i < n:
                checkers[owner[i]].add(row, ids[i])
            elif rec.finish_reason == "stop":
                end_row["dev"] = vs.end_deviation(row, params, prompt + ids, None if u is None else float(u[n]), model.end_ids)

        try:
            eng.replay(prompt, ids, consume)
        finally:
            if grammar is not None:
                grammar.close()
        checks = [c.finish() for c in checkers]
        for k in broke:
            checks[k].ok, checks[k].reason = False, "grammar_violation"
        last = len(rec.parts) - 1
        end_problem = self._end_problem(eng, rec, prompt, end_row.get("dev"))
        if checks[last].ok and end_problem:
            checks[last].ok, checks[last].reason = False, end_problem
        for k, part in enumerate(rec.parts):
            if checks[k].ok and any(eng.is_end(t) for t in part.ids):
                checks[k].ok, checks[k].reason = False, "ran_past_end"
        verdicts = [Verdict(req.request_id, p.peer_id, p.pseudonym, req.model_sha256, c.ok, c.reason, len(p.ids), True,
                            rec.canary, round(c.max_deviation, 4), c.pvalue, c.soft_violations)
                    for p, c in zip(rec.parts, checks) if p.peer_id not in job.skip]
        return _Outcome(verdicts, time.perf_counter() - t0, n)

    def _end_problem(self, eng: Engine, rec: GenerationRecord, prompt: list[int], end_dev: float | None) -> str:
        """Does the way the generation ended hold up? '' if so."""
        if rec.prompt_tokens != len(prompt):
            return "prompt_mismatch"  # it did not run our tokenizer on our request
        if rec.finish_reason != "stop":
            return ""
        stream = TextStream(eng.request_stops(rec.request))
        ids = rec.ids
        for i, t in enumerate(ids):
            stream.push(eng.token_bytes(t))
            if stream.stopped:
                return "" if i == len(ids) - 1 else "ran_past_stop"
        # No stop string: the model itself must have ended here.
        return "" if end_dev is not None and end_dev <= vs.HARD else "early_stop"

    # -- verdicts -------------------------------------------------------------------------------

    def _apply(self, record: GenerationRecord, v: Verdict) -> None:
        self.verdicts.append(v)
        kind = "canary" if v.canary else ("rescored" if v.rescored else "structural")
        self.m_checks.inc(outcome="passed" if v.passed else "failed", kind=kind)
        if not v.passed:
            self.m_failures.inc(reason=v.reason)
            log.warning("verification failed", extra={"node": v.pseudonym, "reason": v.reason, "tokens": v.tokens,
                                                      "max_deviation": v.max_deviation, "canary": v.canary})
        if self.ledger is not None:
            self.ledger.settle_verification(v.request_id, {v.peer_id: (v.passed, v.reason)})
        if self.view is not None:
            self.view.record_verdict(v.peer_id, v.model_sha256, v.passed, v.reason, canary=v.canary)

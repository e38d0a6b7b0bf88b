"""The real node daemon with one cheat switched on: what the adversarial tests run.

    python tests/support/cheating_node.py --cheat MODE [--claim-model GGUF] -- node start ARGS...

Everything else is the genuine `mesh node start` (libp2p, adverts, admission, llama.cpp);
the cheat is patched in before it starts:

  wrong-model    serve --model (another GGUF) while advertising the sha256 of --claim-model
  canned         answer every request with the same canned text
  truncate       stop after a few tokens and claim the generation ran to its length limit
  truncate-stop  stop after a few tokens and claim the model ended it (finish "stop")
  inflate        sign receipts for more completion tokens than were streamed
  replay         re-send the first receipt it ever signed with every later answer
  forge          sign receipts with another key than the node's own
  ignore-grammar run requests without their grammar (unconstrained text for a JSON request)
  fake-json      answer a request that has a grammar with canned JSON that fits it
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CANNED_JSON = '{"answer": "canned", "confidence": 1}'
CANNED = "I am a helpful assistant. The answer to your question is simple: it depends on many factors."
TRUNCATE_AFTER = 3


def cheat_wrong_model(claim: str) -> None:
    from engine.model_file import inspect_model
    from node import daemon

    claimed = inspect_model(claim).sha256
    real = daemon.resolve_model

    def resolve(cfg):
        # The node hashes and loads its own file, then advertises another model's digest.
        return dataclasses.replace(real(cfg), sha256=claimed)

    daemon.resolve_model = resolve


class _FakeGeneration:
    """What Engine.run returns, for steps we make up."""

    def __init__(self, steps, prompt_tokens: int, seed: int, on_close=None):
        self._steps, self.prompt_tokens, self.seed, self._on_close = steps, prompt_tokens, seed, on_close
        self.finish_reason = None
        self.completion_tokens = 0

    def __iter__(self):
        return self._steps

    def __next__(self):
        return next(self._steps)

    def close(self):
        if self._on_close:
            self._on_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def cheat_canned() -> None:
    from engine.llama import Engine, Step

    def run(self, request, *, cancel=None, **_kw):
        prompt = self.prompt_tokens(request)
        budget = request.params.max_tokens - len(request.continuation)
        ids = self.tokenize(CANNED)[:max(0, budget)]

        def steps():
            for t in ids:
                yield Step(t, self.token_bytes(t).decode("utf-8", "replace"))
            yield Step(None, "", finish_reason="length" if len(ids) == budget else "stop")

        return _FakeGeneration(steps(), len(prompt), request.params.seed or 0)

    Engine.run = run  # the node's BatchedEngine.run goes through Engine.run


def cheat_grammar(mode: str) -> None:
    from engine.llama import Engine, Step

    def cheating(real_run):
        def run(self, request, *, cancel=None, **kw):
            if not request.grammar:
                return real_run(self, request, cancel=cancel, **kw)
            if mode == "ignore-grammar":
                # Skips the per-token mask, the cost a cheater would save.
                return real_run(self, dataclasses.replace(request, grammar=""), cancel=cancel, **kw)
            prompt = self.prompt_tokens(request)
            ids = self.tokenize(CANNED_JSON)[: request.params.max_tokens]

            def steps():
                for t in ids:
                    yield Step(t, self.token_bytes(t).decode("utf-8", "replace"))
                yield Step(None, "", finish_reason="stop")

            return _FakeGeneration(steps(), len(prompt), request.params.seed or 0)
        return run

    Engine.run = cheating(Engine.run)  # the node's BatchedEngine.run goes through Engine.run


def cheat_truncate(finish: str) -> None:
    from engine.llama import Engine, Step

    def cheating(real_run):
        def run(self, request, *, cancel=None, **kw):
            gen = real_run(self, request, cancel=cancel, **kw)

            def steps():
                n = 0
                for step in gen:
                    if step.token is None:
                        yield step
                        return
                    yield step
                    n += 1
                    if n >= TRUNCATE_AFTER:
                        gen.close()  # save the compute: the point of cheating
                        yield Step(None, "", finish_reason=finish)
                        return

            return _FakeGeneration(steps(), gen.prompt_tokens, gen.seed, gen.close)
        return run

    Engine.run = cheating(Engine.run)  # the node's BatchedEngine.run goes through Engine.run


def cheat_receipts(mode: str) -> None:
    from node import service
    from protocol.identity import Identity
    from protocol.records import WorkReceipt, _seal

    other = Identity.generate()

    class CheatReceipt(WorkReceipt):
        first: bytes | None = None

        def __init__(self, request_id, model_sha256, prompt_tokens, completion_tokens, *rest):
            if mode == "inflate":
                completion_tokens = completion_tokens * 2 + 5
            super().__init__(request_id, model_sha256, prompt_tokens, completion_tokens, *rest)

        def sign(self, identity) -> bytes:
            if mode == "forge":
                return _seal(self.KIND, dataclasses.asdict(self), other)
            blob = super().sign(identity)
            if mode == "replay":
                if CheatReceipt.first is None:
                    CheatReceipt.first = blob
                return CheatReceipt.first
            return blob

    service.WorkReceipt = CheatReceipt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cheat", required=True, choices=("wrong-model", "canned", "truncate", "truncate-stop", "inflate",
                                                        "replay", "forge", "ignore-grammar", "fake-json"))
    ap.add_argument("--claim-model", help="wrong-model: the GGUF whose sha256 to advertise")
    ap.add_argument("mesh_args", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    mesh_args = args.mesh_args[1:] if args.mesh_args[:1] == ["--"] else args.mesh_args
    if args.cheat == "wrong-model":
        cheat_wrong_model(args.claim_model)
    elif args.cheat == "canned":
        cheat_canned()
    elif args.cheat in ("ignore-grammar", "fake-json"):
        cheat_grammar(args.cheat)
    elif args.cheat in ("truncate", "truncate-stop"):
        cheat_truncate("length" if args.cheat == "truncate" else "stop")
    else:
        cheat_receipts(args.cheat)
    from mesh_cli.main import main as mesh_main

    return mesh_main(mesh_args)


if __name__ == "__main__":
    raise SystemExit(main())

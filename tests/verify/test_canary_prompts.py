"""Canary probes a node can't pick out (issue "Hardening", attack 4): a regex built from the
old canary templates caught 100% of probes. Now probes are conversations from a dialog corpus
with parameters drawn like users' (scripts/bench_canary.py measures a trained classifier)."""

from __future__ import annotations

import random
import re
from collections import Counter

from entry.verify.canary import USER_PROFILES, CanaryConfig, CanaryProber, canary_messages, canary_pool, user_like_params

# The templates probes were made from before (public in the repository's history): the regex
# an attacker builds from them, each {slot} matching anything.
OLD_TEMPLATES = (
    "Can you explain {topic} in simple terms?", "Write a short {form} about {topic}.",
    "What are three tips for {activity}?", "Summarize the idea of {topic} in a few sentences.",
    "I'm planning {activity} with {n} friends on {day}. Any suggestions?",
    "My friend {name} asked me about {topic}. How would you describe it?",
    "Give me a quick overview of {topic}, please.", "{name} wants to get better at {activity}. Where should they start?",
    "Write a {form} for {name} who loves {topic}.",
    "How long does {activity} usually take for a beginner? I have about {n} hours.",
)
OLD_DISTINCT = 3724  # prompts the old templates could make


def old_regex() -> re.Pattern:
    alts = [re.sub(r"\\\{[a-z]+\\\}", ".+?", re.escape(t)) for t in OLD_TEMPLATES]
    return re.compile("^(?:" + "|".join(alts) + ")$", re.S)


def test_the_old_template_regex_catches_none_and_the_pool_is_larger():
    rx = old_regex()
    assert rx.match("Give me a quick overview of tea, please.")  # the regex works on old canaries
    rng = random.Random(5)
    probes = [canary_messages(rng) for _ in range(5000)]
    caught = sum(bool(rx.match(m[-1].content)) for m in probes)
    assert caught == 0
    pool = canary_pool()
    assert len(pool) > 2 * OLD_DISTINCT
    assert len({p[0] for p in pool}) > OLD_DISTINCT  # distinct opening turns alone
    # Like a chat client's requests: alternating roles ending with the user, often with history.
    assert all(m[-1].role == "user" and [x.role for x in m[::2]] == ["user"] * len(m[::2]) for m in probes)
    assert 0.15 < sum(len(m) > 1 for m in probes) / len(probes) < 0.6
    # Not only English: the corpus has 28 languages, as a public mesh's users do.
    assert sum(not m[-1].content.isascii() for m in probes) / len(probes) > 0.2


def test_sampling_parameters_are_drawn_like_users():
    rng = random.Random(9)
    drawn = [user_like_params(rng) for _ in range(4000)]
    counts = Counter((p.temperature, p.max_tokens) for p in drawn)
    share = lambda k: counts[k] / len(drawn)  # noqa: E731
    # The web chat's defaults and a bare API call (the API's defaults) dominate, as in traffic.
    assert abs(share((0.7, 512)) - (USER_PROFILES[0][0] * 0.6 + USER_PROFILES[2][0] / 7 / 12)) < 0.04
    assert abs(share((0.0, 256)) - USER_PROFILES[1][0]) < 0.06
    lengths = {p.max_tokens for p in drawn}
    assert {64, 256, 512, 1024} <= lengths and len(lengths) >= 10  # was (64, 128, 256)
    assert {p.top_p for p in drawn} == {1.0, 0.9, 0.95}


def test_a_probe_request_looks_like_a_chat_request():
    class Backend:
        host = view = None

    prober = CanaryProber(Backend(), verifier=None, config=CanaryConfig(), rng=random.Random(2))
    req = prober.make_request("ab" * 32)
    assert req.kind == "chat" and req.messages and req.messages[-1].role == "user"
    assert req.params.temperature == 0 or req.params.seed is not None  # build_request seeds sampling
    short = CanaryProber(Backend(), verifier=None, config=CanaryConfig(max_tokens=(24,)), rng=random.Random(2))
    assert short.make_request("ab" * 32).params.max_tokens == 24  # tests keep probes short

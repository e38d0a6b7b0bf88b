"""Can a node tell canary probes from user traffic by their text? (entry/verify/canary.py)

The node's best tool here is a text classifier. This trains one, TF-IDF (word 1-2-grams and
character 2-5-grams) + logistic regression, cross-validated, on
  - canaries: prompts exactly as CanaryProber builds them, drawn from one part of the corpus;
  - user prompts: held-out conversations of the same corpus (a disjoint part: conversations
    are grouped by their first turn, and a group goes wholly to one side), sent as a user's
    chat client would send them;
and reports its accuracy: 0.5 is chance. Cross-validation keeps each group in one fold: the
longer prefixes of a conversation repeat its first turns, and a classifier that met them in
training would recognise the conversation, not a canary (on a plain k-fold that lifts the
score to ~0.55 even between two random halves of the same corpus). For comparison it runs the same classifier, and the
regex an attacker builds from the old templates, on the old template canaries.

    python scripts/bench_canary.py [--samples 4000] [--folds 5] [--json]

Limit: what it measures is indistinguishability *from this corpus*; the corpus is public, so a
node that keeps a copy can still match its conversations verbatim (see SECURITY.md).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from entry.verify.canary import canary_messages, dialogues, prefixes  # noqa: E402

# The canary templates before this change (what the attack's regex was built from).
OLD_TEMPLATES = (
    "Can you explain {topic} in simple terms?",
    "Write a short {form} about {topic}.",
    "What are three tips for {activity}?",
    "Summarize the idea of {topic} in a few sentences.",
    "I'm planning {activity} with {n} friends on {day}. Any suggestions?",
    "My friend {name} asked me about {topic}. How would you describe it?",
    "Give me a quick overview of {topic}, please.",
    "{name} wants to get better at {activity}. Where should they start?",
    "Write a {form} for {name} who loves {topic}.",
    "How long does {activity} usually take for a beginner? I have about {n} hours.",
)
OLD_FILL = {
    "topic": ("photosynthesis", "compound interest", "the water cycle", "black holes", "machine learning", "volcanoes",
              "the Roman empire", "sourdough bread", "jazz music", "electric cars", "sleep", "honeybees", "chess openings",
              "the stock market", "coral reefs", "public libraries", "solar panels", "the moon landing", "tea", "origami"),
    "form": ("poem", "story", "note", "limerick", "paragraph", "letter", "haiku", "dialogue"),
    "activity": ("learning guitar", "running a 5k", "baking bread", "gardening", "learning Spanish", "painting",
                 "hiking", "saving money", "cooking dinner", "studying for exams", "woodworking", "birdwatching"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "the weekend"),
    "name": ("Alex", "Sam", "Maria", "Chen", "Priya", "Jonas", "Fatima", "Lucas", "Aiko", "Omar", "Elena", "Kofi"),
}


def old_canary(rng: random.Random) -> str:
    fill = {k: rng.choice(v) for k, v in OLD_FILL.items()}
    fill["n"] = rng.randint(2, 12)
    return rng.choice(OLD_TEMPLATES).format(**fill)


def template_regex() -> re.Pattern:
    """What an attacker builds from the public templates: each slot matches anything."""
    parts = [re.escape(t).replace(r"\{", "{").replace(r"\}", "}") for t in OLD_TEMPLATES]
    parts = [re.sub(r"\{[a-z]+\}", ".+?", p) for p in parts]
    return re.compile("^(?:" + "|".join(parts) + ")$", re.S)


def text(messages) -> str:
    """What a node sees of a chat request, as one string for the classifier."""
    return "\n".join(f"{m.role}: {m.content}" for m in messages)


def group(prefix: tuple[str, ...]) -> str:
    return prefix[0].strip().lower()


def split_corpus(seed: int = 0):
    """Canary part and held-out user part, disjoint by group (first turn)."""
    groups = sorted({group(c) for c in dialogues()})
    random.Random(seed).shuffle(groups)
    canary_groups = set(groups[: len(groups) // 2])
    convs = list(dict.fromkeys(dialogues()))
    return (prefixes([c for c in convs if group(c) in canary_groups]),
            prefixes([c for c in convs if group(c) not in canary_groups]))


def classify(a: list[str], b: list[str], folds: int, seed: int = 0, groups: list[str] | None = None) -> float:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline, make_union

    features = make_union(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1),
                          TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2))
    model = make_pipeline(features, LogisticRegression(max_iter=2000, C=4.0))
    x, y = a + b, [1] * len(a) + [0] * len(b)
    if groups is None:
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return float(cross_val_score(model, x, y, cv=cv, scoring="accuracy").mean())
    cv = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(model, x, y, groups=groups, cv=cv, scoring="accuracy").mean())


def measure(samples: int = 4000, folds: int = 5, seed: int = 0) -> dict:
    rng = random.Random(seed)
    canary_part, user_part = split_corpus(seed)
    n = min(samples, len(canary_part), len(user_part))
    # Distinct prompts in both classes: a prompt repeated across folds would be learnt by heart
    # (repeats are a separate tell: see SECURITY.md).
    canary_prefixes, user_prefixes = rng.sample(canary_part, n), rng.sample(user_part, n)
    canaries = [text(canary_messages(rng, [p])) for p in canary_prefixes]
    users = [text(canary_messages(rng, [p])) for p in user_prefixes]
    groups = [group(p) for p in canary_prefixes + user_prefixes]
    old = [f"user: {old_canary(rng)}" for _ in range(n)]
    regex = template_regex()
    return {
        "corpus_conversation_prefixes": len(canary_part) + len(user_part),
        "samples_per_class": n,
        "folds": folds,
        "accuracy_canary_vs_user": round(classify(canaries, users, folds, seed, groups), 3),
        "accuracy_old_templates_vs_user": round(classify(old, users, folds, seed), 3),
        "old_regex_catches_new_canaries": round(sum(bool(regex.match(t[len("user: "):])) for t in canaries) / n, 4),
        "old_regex_catches_old_canaries": round(sum(bool(regex.match(t[len("user: "):])) for t in old) / n, 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=3000, help="prompts per class (default 3000)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.samples, args.folds, args.seed)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:34} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

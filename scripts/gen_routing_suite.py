"""Writes routing/suites/basic.jsonl: the shipped benchmark suite for the mesh's models.

Run from the repository root: ``python scripts/gen_routing_suite.py``. Deterministic (fixed
seed), so the committed file is exactly what this script writes. Arithmetic, extraction
and string tasks are generated; facts, sentiment and topics are hand-written. The tasks
are ones that tiny models (SmolLM2-135M, Gemma-3 270M) can partly solve, so a suite run
separates models instead of scoring them all zero.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "routing" / "suites" / "basic.jsonl"
SEED = 20240611
LETTERS = "ABCD"


def row(rid: str, task: str, prompt: str | list[dict[str, str]], reference: Any, scorer: str,
        max_tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"id": rid, "task": task}
    if isinstance(prompt, str):
        out["prompt"] = prompt
    else:
        out["messages"] = prompt
    out.update({"reference": reference, "scorer": scorer, "max_tokens": max_tokens})
    return out


def arithmetic(rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for _ in range(10):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append((f"What is {a} + {b}?", a + b))
    for _ in range(8):
        a = rng.randint(20, 99)
        b = rng.randint(1, a - 1)
        rows.append((f"What is {a} - {b}?", a - b))
    for _ in range(8):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        rows.append((f"What is {a} times {b}?", a * b))
    names = ["Tom", "Mia", "Sam", "Lena"]
    things = ["apples", "books", "pencils", "stickers"]
    for name, thing in zip(names, things, strict=True):
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        rows.append((f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?", a + b))
    return [
        row(f"arith-{i + 1:03d}", "arithmetic", f"{q} Answer with just the number.", ans, "number", 16)
        for i, (q, ans) in enumerate(rows)
    ]


MULTIPLE_CHOICE = [
    ("Which planet is known as the Red Planet?", "Mars", ["Venus", "Jupiter", "Saturn"]),
    ("What is the largest ocean on Earth?", "Pacific Ocean", ["Atlantic Ocean", "Indian Ocean", "Arctic Ocean"]),
    ("How many legs does a spider have?", "8", ["6", "10", "4"]),
    ("Which gas do plants take in from the air to make food?", "Carbon dioxide", ["Oxygen", "Helium", "Neon"]),
    ("At sea level, water boils at how many degrees Celsius?", "100", ["50", "80", "120"]),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("Which is the largest animal on Earth?", "Blue whale", ["Elephant", "Giraffe", "Hippopotamus"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("How many days are there in a leap year?", "366", ["364", "365", "367"]),
    ("On which continent is Egypt?", "Africa", ["Asia", "Europe", "South America"]),
    ("Which color do you get by mixing blue and yellow paint?", "Green", ["Purple", "Orange", "Red"]),
    ("Which organ pumps blood through the body?", "Heart", ["Liver", "Lungs", "Brain"]),
    ("At what temperature in degrees Celsius does water freeze?", "0", ["10", "-20", "32"]),
    ("How many continents are there on Earth?", "7", ["5", "6", "9"]),
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("What do bees make?", "Honey", ["Milk", "Silk", "Cheese"]),
    ("In which country are the pyramids of Giza?", "Egypt", ["Mexico", "Peru", "India"]),
    ("How many minutes are there in one hour?", "60", ["30", "90", "100"]),
    ("Which musical instrument has 88 keys?", "Piano", ["Guitar", "Violin", "Flute"]),
    ("Which language is mainly spoken in Brazil?", "Portuguese", ["Spanish", "French", "English"]),
    ("What is the tallest mountain above sea level?", "Mount Everest", ["K2", "Kilimanjaro", "Mont Blanc"]),
    ("Which animal is a mammal?", "Dolphin", ["Shark", "Trout", "Octopus"]),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    ("What is the main gas in the air we breathe?", "Nitrogen", ["Oxygen", "Carbon dioxide", "Hydrogen"]),
]


def multiple_choice(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for i, (q, right, wrong) in enumerate(MULTIPLE_CHOICE):
        options = [right, *wrong]
        rng.shuffle(options)
        letter = LETTERS[options.index(right)]
        body = "\n".join(f"{LETTERS[j]}. {o}" for j, o in enumerate(options))
        prompt = f"{q}\n{body}\nAnswer with just the letter of the correct option."
        out.append(row(f"mc-{i + 1:03d}", "multiple_choice", prompt, letter, "choice", 8))
    return out


FIRST_NAMES = ["Alice", "Brian", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
               "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro"]
DOMAINS = ["example.com", "mail.org", "company.net", "school.edu"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def extraction(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    names = rng.sample(FIRST_NAMES, len(FIRST_NAMES))
    for i in range(6):
        name = names[i]
        email = f"{name.lower()}.{rng.choice(['smith', 'lee', 'garcia', 'novak'])}@{rng.choice(DOMAINS)}"
        prompt = (f"For questions about the order, write to {name} at {email} before Friday. "
                  "What is the email address in this sentence? Answer with just the email address.")
        out.append(row(f"extract-email-{i + 1:02d}", "extraction", prompt, [email], "contains", 24))
    for i in range(6):
        month, day, year = rng.choice(MONTHS), rng.randint(1, 28), rng.randint(1990, 2030)
        prompt = (f"The meeting with {names[6 + i]} was moved to {month} {day}, {year}. "
                  "In which year is the meeting? Answer with just the year.")
        out.append(row(f"extract-year-{i + 1:02d}", "extraction", prompt, year, "number", 12))
    for i in range(6):
        kg, price = rng.randint(2, 40), rng.randint(50, 500)
        prompt = (f"The package weighs {kg} kilograms and shipping costs {price} dollars. "
                  "How many kilograms does the package weigh? Answer with just the number.")
        out.append(row(f"extract-number-{i + 1:02d}", "extraction", prompt, kg, "number", 12))
    for i in range(6):
        sender, receiver = names[(i * 2) % 16], names[(i * 2 + 5) % 16]
        prompt = (f"Yesterday {sender} sent the final report to {receiver}. "
                  "Who sent the report? Answer with just the name.")
        pattern = rf"(?is)^(?!.*\b{receiver}\b).*\b{sender}\b"
        out.append(row(f"extract-name-{i + 1:02d}", "extraction", prompt, pattern, "regex", 8))
    return out


SENTIMENT = [
    ("I loved this movie, the acting was wonderful.", "positive"),
    ("The food was cold and the waiter was rude.", "negative"),
    ("Best purchase I have made all year, it works perfectly.", "positive"),
    ("The phone broke after two days. Very disappointed.", "negative"),
    ("What a beautiful day at the beach with my friends!", "positive"),
    ("This book was boring and far too long.", "negative"),
    ("The hotel staff were friendly and the room was spotless.", "positive"),
    ("I waited an hour and the package never arrived.", "negative"),
    ("The concert was amazing, I would go again tomorrow.", "positive"),
    ("Terrible service, I will never shop here again.", "negative"),
    ("My new shoes are comfortable and look great.", "positive"),
    ("The app keeps crashing and deleted my notes.", "negative"),
    ("Thank you so much, the gift made me very happy.", "positive"),
    ("The soup tasted awful and it made me sick.", "negative"),
    ("Our teacher is kind and explains everything clearly.", "positive"),
    ("The train was late again and it was freezing inside.", "negative"),
]

TOPICS = [
    ("The striker scored twice in the second half to win the match.", "sports"),
    ("Add the flour and sugar, then bake the cake for thirty minutes.", "food"),
    ("The new laptop has a faster processor and more memory.", "technology"),
    ("Heavy rain and strong winds are expected tomorrow afternoon.", "weather"),
    ("The tennis player won the final in three sets.", "sports"),
    ("This pasta sauce is made with fresh tomatoes and basil.", "food"),
    ("The company released a software update that fixes security bugs.", "technology"),
    ("It will be sunny and warm all weekend with no clouds.", "weather"),
    ("The basketball team lost their last game by two points.", "sports"),
    ("Slice the bread and spread butter and jam on each piece.", "food"),
    ("Smartphones now use chips that can run small AI models.", "technology"),
    ("Snow is falling in the mountains and temperatures are below zero.", "weather"),
]
TOPIC_WORDS = ["sports", "food", "technology", "weather"]


def classification() -> list[dict[str, Any]]:
    out = []
    for i, (text, label) in enumerate(SENTIMENT):
        other = "negative" if label == "positive" else "positive"
        prompt = (f'Is the sentiment of this review positive or negative?\nReview: "{text}"\n'
                  "Answer with one word: positive or negative.")
        pattern = rf"(?is)^(?!.*\b{other}\b).*\b{label}\b"
        out.append(row(f"sentiment-{i + 1:02d}", "sentiment", prompt, pattern, "regex", 8))
    for i, (text, label) in enumerate(TOPICS):
        others = "|".join(w for w in TOPIC_WORDS if w != label)
        prompt = (f'What is the topic of this sentence?\nSentence: "{text}"\n'
                  "Answer with one word: sports, food, technology or weather.")
        pattern = rf"(?is)^(?!.*\b(?:{others})\b).*\b{label}\b"
        out.append(row(f"topic-{i + 1:02d}", "topic", prompt, pattern, "regex", 8))
    return out


CAPITALS = [
    ("France", ["Paris"]), ("Japan", ["Tokyo"]), ("Italy", ["Rome"]), ("Germany", ["Berlin"]),
    ("Spain", ["Madrid"]), ("Canada", ["Ottawa"]), ("Egypt", ["Cairo"]), ("Russia", ["Moscow"]),
    ("China", ["Beijing"]), ("the United Kingdom", ["London"]), ("Greece", ["Athens"]),
    ("Portugal", ["Lisbon"]), ("Norway", ["Oslo"]), ("Ireland", ["Dublin"]), ("Kenya", ["Nairobi"]),
    ("Argentina", ["Buenos Aires"]), ("Thailand", ["Bangkok"]), ("Austria", ["Vienna"]),
    ("Poland", ["Warsaw"]), ("Sweden", ["Stockholm"]), ("South Korea", ["Seoul"]),
    ("Australia", ["Canberra"]), ("Peru", ["Lima"]), ("Cuba", ["Havana"]),
]

FACTS = [
    ("What color is the sky on a clear day?", ["blue"]),
    ("Which animal says 'moo'?", ["cow"]),
    ("What is the opposite of 'hot'?", ["cold"]),
    ("Which month comes after March?", ["April"]),
    ("Which day of the week comes after Monday?", ["Tuesday"]),
    ("What do we call frozen water?", ["ice"]),
    ("Who was the first President of the United States?", ["Washington"]),
    ("What is the largest planet in our solar system?", ["Jupiter"]),
    ("What language is mainly spoken in Spain?", ["Spanish"]),
    ("What is the opposite of 'up'?", ["down"]),
    ("Which season comes after winter?", ["spring"]),
    ("What is the name of the star at the center of our solar system?", ["Sun"]),
]


def factual() -> list[dict[str, Any]]:
    out = []
    for i, (country, refs) in enumerate(CAPITALS):
        prompt = f"What is the capital of {country}? Answer with just the city name."
        out.append(row(f"capital-{i + 1:02d}", "capitals", prompt, refs, "contains", 12))
    system = "You are a helpful assistant. Answer in as few words as possible."
    for i, (q, refs) in enumerate(FACTS):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"{q} Answer with one word."}]
        out.append(row(f"fact-{i + 1:02d}", "facts", messages, refs, "contains", 12))
    return out


WORDS = ["apple", "river", "garden", "window", "tiger", "yellow", "planet", "butter", "silver",
         "candle", "forest", "pocket", "rabbit", "orange", "winter", "guitar", "button", "dragon"]
SHORT_WORDS = ["cat", "dog", "sun", "pen", "cup", "map", "bus", "hat"]
SENTENCES = ["The cat sat on the mat", "I like green tea", "We walked to the old bridge",
             "Birds sing in the morning", "She reads a book every night"]


def strings(rng: random.Random) -> list[dict[str, Any]]:
    out = []
    words = rng.sample(WORDS, len(WORDS))
    n = 0

    def add(prompt: str, ref: Any, scorer: str, max_tokens: int = 8) -> None:
        nonlocal n
        n += 1
        out.append(row(f"string-{n:02d}", "string", prompt, ref, scorer, max_tokens))

    for w in words[:6]:
        add(f'Write the word "{w}" in uppercase letters. Answer with just the word.',
            rf"^\W*{w.upper()}\W*$", "regex")
    for w in words[6:10]:
        add(f'Write the word "{w.upper()}" in lowercase letters. Answer with just the word.',
            rf"^\W*{w}\W*$", "regex")
    for w in words[10:16]:
        add(f'What is the first letter of the word "{w}"? Answer with just the letter.', w[0], "exact")
    for w in words[16:18] + words[:2]:
        add(f'What is the last letter of the word "{w}"? Answer with just the letter.', w[-1], "exact")
    for w in rng.sample(SHORT_WORDS, 4):
        add(f'Spell the word "{w}" backwards. Answer with just the reversed word.', w[::-1], "exact")
    for s in SENTENCES[:4]:
        add(f'How many words are in this sentence: "{s}"? Answer with just the number.',
            len(s.split()), "number")
    return out


def main() -> None:
    rng = random.Random(SEED)
    rows = (arithmetic(rng) + multiple_choice(rng) + extraction(rng) + classification()
            + factual() + strings(rng))
    for r in rows:
        if r["scorer"] == "regex":
            re.compile(r["reference"])
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tasks: dict[str, int] = {}
    for r in rows:
        tasks[r["task"]] = tasks.get(r["task"], 0) + 1
    print(f"wrote {len(rows)} rows to {OUT}: {tasks}")


if __name__ == "__main__":
    main()

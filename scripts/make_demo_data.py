"""Generate the demo dataset: extract a person's record as strict JSON from a short text.

The task is the chapter's "template control" case: the answer must be exactly one JSON
object with the keys name, age and city, in that order, and nothing else. The
instructions do not spell the keys out: a small instruct model asked this invents its own
(occupation, location...), wraps the JSON in prose or markdown, or keeps talking.

Deterministic: the same seed gives byte-identical files.
    python scripts/make_demo_data.py  # writes src/sftlab/demo_data/{train,eval}.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 20261124
TRAIN_SIZE, EVAL_SIZE = 1200, 100
OUT = Path(__file__).resolve().parent.parent / "src" / "sftlab" / "demo_data"

FIRST = [
    "Maria",
    "John",
    "Aisha",
    "Kenji",
    "Lena",
    "Omar",
    "Sofia",
    "Liam",
    "Priya",
    "Mateo",
    "Chloe",
    "Noah",
    "Yuki",
    "Fatima",
    "Lucas",
    "Ingrid",
    "Ravi",
    "Elena",
    "Tomas",
    "Amara",
    "Felix",
    "Hana",
    "Diego",
    "Nora",
    "Samuel",
    "Mei",
    "Jonas",
    "Zara",
    "Pavel",
    "Leila",
    "Oscar",
    "Anya",
    "Hugo",
    "Ines",
    "Kofi",
    "Greta",
]
LAST = [
    "Lopez",
    "Smith",
    "Khan",
    "Tanaka",
    "Fischer",
    "Haddad",
    "Rossi",
    "Murphy",
    "Patel",
    "Garcia",
    "Dubois",
    "Kim",
    "Sato",
    "Nowak",
    "Silva",
    "Berg",
    "Iyer",
    "Petrova",
    "Novak",
    "Okafor",
    "Weber",
    "Park",
    "Costa",
    "Larsen",
    "Cohen",
    "Chen",
    "Meyer",
    "Ali",
    "Ivanov",
    "Rahman",
    "Jensen",
    "Volkova",
    "Martin",
    "Moreau",
]
CITIES = [
    "Lisbon",
    "Toronto",
    "Nairobi",
    "Osaka",
    "Berlin",
    "Cairo",
    "Milan",
    "Dublin",
    "Mumbai",
    "Bogota",
    "Lyon",
    "Seoul",
    "Sapporo",
    "Krakow",
    "Recife",
    "Oslo",
    "Chennai",
    "Sofia",
    "Prague",
    "Lagos",
    "Vienna",
    "Busan",
    "Porto",
    "Bergen",
    "Haifa",
    "Chengdu",
    "Hamburg",
    "Karachi",
    "Kazan",
    "Dhaka",
    "Aarhus",
    "Riga",
]
JOBS = [
    "a nurse",
    "a teacher",
    "an engineer",
    "a baker",
    "a pilot",
    "a journalist",
    "a chemist",
    "a carpenter",
    "a lawyer",
    "a painter",
    "a chef",
    "a librarian",
    "a programmer",
    "a farmer",
    "a dentist",
    "a musician",
]
TEXTS = [
    "{name}, {age}, moved to {city} last spring to work as {job}.",
    "Meet {name}: {job} from {city} who just turned {age}.",
    "{name} is {age} years old and lives in {city}, where they work as {job}.",
    "Born {age} years ago, {name} now works as {job} in {city}.",
    "At {age}, {name} left everything behind and settled in {city} as {job}.",
    "Our new colleague {name} ({age}) joins us from {city}; they have been {job} for years.",
    "{city} local {name}, aged {age}, won the regional chess cup this weekend.",
    "Profile: {name}. Age: {age}. Based in {city}. Works as {job}.",
    "{name} celebrated a {age}th birthday in {city} with friends from work.",
    "The interview was with {name}, {job} in {city}, who is {age}.",
]
# The instructions ask for "the record" without spelling out its keys: the house format (exactly
# name, age and city, no job) is what fine-tuning teaches. Asked this way, the base
# model invents its own keys (occupation, location...) or answers in prose.
INSTRUCTIONS = [
    "Extract the person's details as a JSON record.",
    "Turn this text into our standard person record.",
    "Fill in the person record for the text below.",
    "Give me the structured record of the person described.",
    "Return the person in this text as a JSON object.",
]


def example(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age, city = rng.randint(19, 79), rng.choice(CITIES)
    text = rng.choice(TEXTS).format(name=name, age=age, city=city, job=rng.choice(JOBS))
    answer = json.dumps({"name": name, "age": age, "city": city})
    prompt = f"{rng.choice(INSTRUCTIONS)}\n\nText: {text}"
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def main() -> None:
    rng = random.Random(SEED)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < TRAIN_SIZE + EVAL_SIZE:
        row = example(rng)
        key = row["messages"][0]["content"]
        if key not in seen:  # no prompt appears twice, so train and eval never overlap
            seen.add(key)
            rows.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:TRAIN_SIZE]), ("eval", rows[TRAIN_SIZE:])):
        with (OUT / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {len(part)} rows to {OUT / f'{name}.jsonl'}")


if __name__ == "__main__":
    main()

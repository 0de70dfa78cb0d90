"""Seeded synthetic arithmetic word problems: the embedded default dataset (no file needed).

Records follow the LLM-Adapters format; the output states the computation and ends with
"The answer is N." so both parsing protocols can read it. The test split never repeats
a training question.
"""

from __future__ import annotations

import random

NAMES = ("Tom", "Ana", "Lee", "Mia", "Sam", "Zoe")
ITEMS = ("apples", "pens", "coins", "books", "cards", "shells")
TEMPLATES = {
    "+": "{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
    "-": "{name} has {a} {item}. {name} gives away {b} {item}. How many {item} does {name} have left?",
    "*": "{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in all?",
}


def arith_record(rng: random.Random, max_operand: int) -> dict[str, str]:
    op = rng.choice(sorted(TEMPLATES))
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if op == "-" and b > a:
        a, b = b, a
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    question = TEMPLATES[op].format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
    return {
        "instruction": question,
        "input": "",
        "output": f"{a} {op} {b} = {result}. The answer is {result}.",
        "answer": str(result),
    }


def arith_splits(num_train: int, num_test: int, max_operand: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Disjoint train and test records; raises if the operand range cannot supply enough."""
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    attempts = 0
    while len(records) < num_train + num_test:
        attempts += 1
        if attempts > 100 * (num_train + num_test) + 1000:
            raise ValueError(
                f"dataset.arith.max_operand={max_operand} is too small for "
                f"{num_train + num_test} distinct problems"
            )
        record = arith_record(rng, max_operand)
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    return records[:num_train], records[num_train:]

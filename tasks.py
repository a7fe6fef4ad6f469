"""
Tasks with exact answers, generated offline from a seed: prompts for the analysis and the RL training.

    arithmetic  "What is 37 + 48?"-style problems, small numbers, one or two operations
    word        short grade-school word problems (shopping, sharing, rates) with integer answers

Every problem is asked with the authors' system prompt (BUPO.md 3.1), so the answer is expected in \\boxed{}.
Train and test are disjoint by construction: a question belongs to the test split when the CRC-32 of its
text is divisible by TEST_EVERY, so no test question is ever drawn for training, whatever the seeds and sizes.
"""
import random
import zlib
from dataclasses import dataclass

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
TEST_EVERY = 8  # about 1 question in 8 is held out


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    def messages(self, system: bool = True) -> list[dict]:
        head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
        return head + [{"role": "user", "content": self.question}]


def arithmetic(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
    form = rng.randrange(4)
    if form == 0:
        return Problem(f"What is {a} + {b}?", str(a + b))
    if form == 1:
        a, b = max(a, b), min(a, b)
        return Problem(f"What is {a} - {b}?", str(a - b))
    if form == 2:
        return Problem(f"What is {a} * {c}?", str(a * c))
    return Problem(f"What is {a} + {b} * {c}?", str(a + b * c))


NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells"]


def word(rng: random.Random) -> Problem:
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 20), rng.randint(2, 9)
    form = rng.randrange(5)
    if form == 0:
        return Problem(f"{n} has {a} {item}. {m} gives {n} {b} more. How many {item} does {n} have now?", str(a + b))
    if form == 1:
        a = a + b
        return Problem(f"{n} has {a} {item} and gives {b} of them to {m}. How many {item} does {n} have left?", str(a - b))
    if form == 2:
        return Problem(f"A box holds {c} {item}. {n} buys {b} boxes. How many {item} does {n} buy in total?", str(b * c))
    if form == 3:
        total = b * c
        return Problem(f"{n} shares {total} {item} equally among {c} friends. How many {item} does each friend get?", str(b))
    price = rng.randint(2, 12)
    return Problem(f"One {item[:-1]} costs {price} dollars. {n} buys {c} of them and pays with a {100}-dollar bill. "
                   "How many dollars of change does {n} get?".replace("{n}", n), str(100 - price * c))


TASKS = {"arithmetic": arithmetic, "word": word}


def problems(task: str, n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """n problems of `task` from the given split, reproducible from (seed, split)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    rng, out = random.Random(f"{task}/{split}/{seed}"), []
    while len(out) < n:
        p = TASKS[task](rng)
        if (zlib.crc32(p.question.encode()) % TEST_EVERY == 0) == (split == "test"):
            out.append(p)
    return out

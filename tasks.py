"""
Tasks with exact answers, generated offline from a seed: prompts for the analysis and the RL training.

    add         "What is 3 + 5?": one-digit sums, the task a 135M model can learn in tens of RL steps
    arithmetic  "What is 37 + 48?"-style problems, small numbers, one or two operations
    word        short grade-school word problems (shopping, sharing, rates) with integer answers

Every problem is asked with the authors' system prompt (BUPO.md 3.1), so the answer is expected in \\boxed{}.
Departure: the user message also ends with FORMAT_HINT ("... for example \\boxed{5}."); without it the small
offline models almost never write \\boxed{} (SmolLM2-135M: 0 of 64 answers), so every reward would be 0 and RL
would have nothing to learn from. With shots=1 (train.py and analyze.py --shots 1) one worked example of the
task (DEMOS: a training-split question, a one-line solution ending in \\boxed{}) comes before the question as
an earlier user / assistant turn; this raises SmolLM2-135M's base rate on `add` from about 1% to about 30%
(T = 1, 128 samples), so that most groups of 8 hold both a right and a wrong answer. Answers are
scored by the authors' reward: 1 if the content of the LAST \\boxed{...} (or "\\boxed ...") of the response,
after the Hendrycks MATH string normalisation, equals the normalised answer, else 0 (no box: 0). The reward
functions are pure, never raise and never evaluate anything; their cost is linear in the response length.
Train and test are disjoint by construction: a question belongs to the test split when the CRC-32 of its
text is divisible by TEST_EVERY, so no test question is ever drawn for training, whatever the seeds and sizes.
"""
import random
import zlib
from dataclasses import dataclass

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
FORMAT_HINT = "Put the final answer in \\boxed{}, for example \\boxed{5}."
TEST_EVERY = 8  # about 1 question in 8 is held out


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str

    def messages(self, system: bool = True, demo: tuple[str, str] | None = None) -> list[dict]:
        """The chat of the problem: the authors' system prompt, then, given a demo (question, solution), that
        worked example as an earlier turn, then the question with FORMAT_HINT."""
        head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
        if demo:
            head += [{"role": "user", "content": f"{demo[0]} {FORMAT_HINT}"}, {"role": "assistant", "content": demo[1]}]
        return head + [{"role": "user", "content": f"{self.question} {FORMAT_HINT}"}]


def add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Problem(f"What is {a} + {b}?", str(a + b))


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


TASKS = {"add": add, "arithmetic": arithmetic, "word": word}
# one worked example per task for --shots 1, each a training-split question (tested), never a test one
DEMOS = {
    "add": ("What is 2 + 3?", "2 + 3 = 5. The answer is \\boxed{5}."),
    "arithmetic": ("What is 12 + 4 * 3?", "4 * 3 = 12, and 12 + 12 = 24. The answer is \\boxed{24}."),
    "word": ("Mia has 7 shells. Sam gives Mia 5 more. How many shells does Mia have now?",
             "Mia has 7 + 5 = 12 shells. The answer is \\boxed{12}."),
}


def chat(problem: Problem, task: str, shots: int = 0) -> list[dict]:
    """The messages of a problem of `task` with `shots` (0 or 1) worked examples before it."""
    if shots not in (0, 1):
        raise ValueError(f"--shots must be 0 or 1, not {shots}")
    return problem.messages(demo=DEMOS[task] if shots else None)


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


# -----------------------------------------------------------------------------
# the reward: verl/utils/reward_score/math.py as the authors use it (BUPO.md 3.1), quirks included:
# "\boxed " anywhere wins over a later "\boxed{}", a normalisation step that raises falls back to comparing the
# raw strings, and any other failure scores 0.

def last_boxed(text: str) -> str | None:
    """The last "\boxed{...}" (braces balanced) of text, or the text after the last "\boxed " up to a "$"."""
    if "\\boxed " in text:
        return "\\boxed " + text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None  # unbalanced braces: no answer


def remove_boxed(s: str) -> str:
    for left in ("\\boxed ", "\\boxed{"):
        if s.startswith(left):
            if left == "\\boxed{" and not s.endswith("}"):
                break
            return s[len(left):] if left == "\\boxed " else s[len(left):-1]
    raise ValueError(f"not a boxed answer: {s[:30]!r}")


def _fix_fracs(s: str) -> str:  # \frac12 -> \frac{1}{2}, \frac1{b} -> \frac{1}{b}
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part[0] == "{":  # IndexError on an empty part, as in the original
            out += part
        elif len(part) < 2:
            return s
        elif part[1] != "{":
            out += "{" + part[0] + "}{" + part[1] + "}" + part[2:]
        else:
            out += "{" + part[0] + "}" + part[1:]
    return out


def _fix_a_slash_b(s: str) -> str:  # "3/4" -> \frac{3}{4}; int() of a non-number raises, as in the original
    if len(s.split("/")) != 2:
        return s
    a, b = (int(x) for x in s.split("/"))
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _fix_sqrt(s: str) -> str:  # \sqrt3 -> \sqrt{3}
    parts = s.split("\\sqrt")
    return parts[0] + "".join("\\sqrt" + (p if p[0] == "{" else "{" + p[0] + "}" + p[1:]) for p in parts[1:])


def strip_string(s: str) -> str:
    """The Hendrycks MATH normalisation, step for step; it may raise on malformed input (see is_equiv)."""
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in s:  # units on the right
        parts = s.split("\\text{ ")
        if len(parts) != 2:
            raise ValueError("several \\text{ } units")
        s = parts[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if len(s.split("=")) == 2 and len(s.split("=")[0]) <= 2:  # "x = 5" -> " 5"
        s = s.split("=")[1]
    s = _fix_sqrt(s).replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str, b: str) -> bool:
    try:
        return strip_string(a) == strip_string(b)
    except Exception:  # the original compares the raw strings when the normalisation fails
        return a == b


def reward(response: str, answer: str) -> float:
    """1.0 if the last boxed answer of the response equals the ground truth after normalisation, else 0.0.
    Pure: never raises, never evaluates anything."""
    try:
        boxed = last_boxed(response)
        return float(boxed is not None and is_equiv(remove_boxed(boxed), answer))
    except Exception:
        return 0.0

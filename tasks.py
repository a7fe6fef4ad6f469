"""
Tasks with exact answers, generated offline from a seed: prompts for the analysis and the
RL training.

    add         "What is 3 + 5?": one-digit sums, which a 135M model learns in tens of RL steps
    arithmetic  "What is 37 + 48?"-style problems, small numbers, one or two operations
    word        short grade-school word problems (shopping, sharing, rates) with integer answers
    sum2 .. sum4, sum2x3   sums of two 2- to 4-digit numbers, or of three 2-digit ones (difficulty)

Every problem is asked with the authors' system prompt, so the answer is expected in
\\boxed{}. Departure: the user message also ends with FORMAT_HINT ("... for example
\\boxed{5}."); without it the small offline models almost never write \\boxed{}
(SmolLM2-135M: 0 of 64 answers), so every reward would be 0 and RL would have nothing to
learn from. With shots=1 (train.py and analyze.py --shots 1) one worked example of the
task (DEMOS: a training-split question, a one-line solution ending in \\boxed{}) comes
before the question as an earlier user / assistant turn; this raises SmolLM2-135M's base
rate on `add` from about 1% to about 30% (T = 1, 128 samples), so that most groups of 8
hold both a right and a wrong answer. Answers are scored by the authors' reward: 1 if the
content of the LAST \\boxed{...} (or "\\boxed ...") of the response, after the Hendrycks
MATH string normalisation, equals the normalised answer, else 0 (no box: 0). The reward
functions are pure, never raise and never evaluate anything; their cost is linear in the
response length. Train and test are disjoint by construction: a question belongs to the
test split when the CRC-32 of its text is divisible by TEST_EVERY, so no test question is
ever drawn for training, whatever the seeds and sizes.
"""
import functools
import math
import random
import zlib
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import numpy as np

from infra import cli, data
from infra.errors import InputError, shown

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
FORMAT_HINT = "Put the final answer in \\boxed{}, for example \\boxed{5}."
TEST_EVERY = 8  # about 1 question in 8 is held out


@dataclass(frozen=True)
class Problem:
    question: str
    answer: str
    # a file record's own worked solution (a MATH-style boxed one), shown when the record is
    # the worked example of --shots 1; "" for the others
    solution: str = field(default="", compare=False)

    def messages(self, system: bool = True, demo: tuple[str, str] | None = None) -> list[dict]:
        """The chat: the authors' system prompt, the worked example `demo` (question,
        solution) as an earlier turn, then the question with FORMAT_HINT."""
        head = [{"role": "system", "content": SYSTEM_PROMPT}] if system else []
        if demo:
            head += [{"role": "user", "content": f"{demo[0]} {FORMAT_HINT}"},
                     {"role": "assistant", "content": demo[1]}]
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


NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Felix", "Grace", "Hugo", "Iris", "Jack", "Lena",
         "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells"]


def word(rng: random.Random) -> Problem:
    n, m = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, b, c = rng.randint(3, 40), rng.randint(2, 20), rng.randint(2, 9)
    form = rng.randrange(5)
    if form == 0:
        return Problem(f"{n} has {a} {item}. {m} gives {n} {b} more. How many {item} does {n} have "
                       f"now?", str(a + b))
    if form == 1:
        a = a + b
        return Problem(f"{n} has {a} {item} and gives {b} of them to {m}. How many {item} does {n} "
                       f"have left?", str(a - b))
    if form == 2:
        return Problem(f"A box holds {c} {item}. {n} buys {b} boxes. How many {item} does {n} buy "
                       f"in total?", str(b * c))
    if form == 3:
        total = b * c
        return Problem(f"{n} shares {total} {item} equally among {c} friends. How many {item} does "
                       f"each friend get?", str(b))
    price = rng.randint(2, 12)
    return Problem(f"One {item[:-1]} costs {price} dollars. {n} buys {c} of them and pays with a "
                   f"{100}-dollar bill. "
                   "How many dollars of change does {n} get?".replace("{n}", n),
                   str(100 - price * c))


def sums(digits: int, operands: int = 2):
    """The `sum*` tasks: sums of `operands` numbers of exactly `digits` digits. Digits and
    operands are the difficulty knob (experiments/calibrate.py); the question space is large
    enough for a held-out set of thousands."""
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1

    def task(rng: random.Random) -> Problem:
        xs = [rng.randint(lo, hi) for _ in range(operands)]
        return Problem(f"What is {' + '.join(map(str, xs))}?", str(sum(xs)))
    return task


TASKS = {"add": add, "arithmetic": arithmetic, "word": word,
         "sum2": sums(2), "sum3": sums(3), "sum4": sums(4), "sum2x3": sums(2, 3)}
HELP = ("add: one-digit sums; sum2 / sum3 / sum4: sums of two 2- / 3- / 4-digit numbers; sum2x3: "
        "three 2-digit numbers; arithmetic: +, -, * on numbers up to 50, one or two operations; "
        "word: short word problems")
# one worked example per task for --shots 1, each a training-split question (tested),
# never a test one
DEMOS = {
    "add": ("What is 2 + 3?", "2 + 3 = 5. The answer is \\boxed{5}."),
    "arithmetic": ("What is 12 + 4 * 3?",
                   "4 * 3 = 12, and 12 + 12 = 24. The answer is \\boxed{24}."),
    "word": ("Mia has 7 shells. Sam gives Mia 5 more. How many shells does Mia have now?",
             "Mia has 7 + 5 = 12 shells. The answer is \\boxed{12}."),
    "sum2": ("What is 47 + 38?", "47 + 38 = 85. The answer is \\boxed{85}."),
    "sum3": ("What is 472 + 356?", "472 + 356 = 828. The answer is \\boxed{828}."),
    "sum4": ("What is 4721 + 3568?", "4721 + 3568 = 8289. The answer is \\boxed{8289}."),
    "sum2x3": ("What is 47 + 38 + 16?",
               "47 + 38 = 85, and 85 + 16 = 101. The answer is \\boxed{101}."),
}


PROMPT_FORMATS = ("hint", "paper")


def chat(problem: Problem, task: str | None, shots: int = 0, fmt: str = "hint",
         demo: tuple[str, str] | None = None) -> list[dict]:
    """The messages of a problem of `task` (None: from a file). fmt "hint": the authors'
    system prompt, `shots` (0 or 1) worked examples (`demo`, else the task's), the question
    with FORMAT_HINT; "paper": the system prompt and the question alone (section 5.1)."""
    if shots not in (0, 1):
        raise ValueError(f"--shots must be 0 or 1, not {shots}")
    if fmt == "paper":
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": problem.question}]
    return problem.messages(demo=(demo or DEMOS[task]) if shots else None)


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


def longest_prompt(tok, task: str, shots: int = 0, seed: int = 0, n: int = 64) -> int:
    """Tokens in the longest chat prompt of n problems of each split: what prompt +
    response must fit in a context, checked before any sampling (cli.fits_context)."""
    return max(len(tok.encode_chat(chat(p, task, shots))) for split in ("train", "test")
               for p in problems(task, n, seed, split))


# -----------------------------------------------------------------------------
# problems from files: train.py --data and --eval-data, analyze.py --data

QUESTION_KEYS = ("question", "problem", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "solution")


def read_problems(path, question_key: str | None = None, answer_key: str | None = None,
                  seen: dict | None = None) -> list:
    """The problems of a JSONL (or .parquet) file. The question is the first of
    QUESTION_KEYS a record has, the answer the first of ANSWER_KEYS; question_key /
    answer_key name other fields. An answer ending in "#### 42" (GSM8K) is its tail, one
    with a \\boxed{} (a MATH `solution`) its last box; a `solution` with neither is
    refused. A record without them is refused as file:line (infra/data.py). seen: as
    data.records."""
    out = []
    for where, rec in data.records(path, seen):
        q = _text(rec, where, question_key, QUESTION_KEYS, "question")
        a = _text(rec, where, answer_key, ANSWER_KEYS, "answer")
        solution = not answer_key and next(k for k in ANSWER_KEYS if k in rec) == "solution"
        if solution and "####" not in a and "\\boxed" not in a:
            # a worked solution without a marked final answer would be compared whole
            raise InputError(f"{where}: the solution has no \\boxed{{}} or '####' final answer; "
                             f"name the answer field with --answer-key")
        out.append(Problem(q, _answer(a, where), worked_solution(rec)))
    return out


def worked_solution(rec: dict) -> str:
    """A record's own `solution` when it holds a \\boxed{} answer (MATH style), else "" (a
    GSM8K "#### 42" solution is reasoning the prompt's format does not use)."""
    text = rec.get("solution")
    boxed = isinstance(text, str) and "\\boxed" in text and "####" not in text
    return text.strip() if boxed else ""


def _text(rec: dict, where: str, key: str | None, keys: tuple, what: str) -> str:
    found = [key] if key else [k for k in keys if k in rec]
    if not found or found[0] not in rec:
        looked = ", ".join(repr(k) for k in ([key] if key else keys))
        raise InputError(f"{where}: no {what} (looked for {looked}); name the field with "
                         f"--{what}-key")
    v = rec[found[0]]
    if (isinstance(v, bool) or not isinstance(v, (str, int, float, Decimal))
            or not str(v).strip()
            or (isinstance(v, (float, Decimal)) and not math.isfinite(v))):   # NaN, Infinity
        raise InputError(f"{where}: the {what} ({found[0]!r}) is {shown(v)}, not text "
                         f"or a number")
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:     # "\ud83d" alone: half of a surrogate pair
            raise InputError(f"{where}: the {what} has a lone surrogate (\\u{ord(v[e.start]):04x} "
                             f"at character {e.start}), half of a character; fix its escape") \
                from None
        return v.strip()
    return number_text(v)


def number_text(v) -> str:
    """A numeric answer (a JSON number, a parquet integer, float or decimal) in its shortest
    decimal form: 4.0 and 4.00 are "4", 2.50 is "2.5" (docs/usage.md)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    if isinstance(v, Decimal):
        return format(v.normalize(), "f")
    return str(v)


def _answer(text: str, where: str) -> str:
    """The reference answer of a field: GSM8K's "#### 42" tail, MATH's last \\boxed{}, or
    as is."""
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip()
    elif "\\boxed" in text:
        boxed = last_boxed(text)
        try:
            text = remove_boxed(boxed).strip() if boxed else ""
        except ValueError:   # a "\\fbox{}", which is no boxed answer
            text = ""
        if not text:
            raise InputError(f"{where}: the answer's last \\boxed{{}} is empty or unbalanced")
    if not text:
        raise InputError(f"{where}: the answer after '####' is empty")
    return text


def epoch_draw(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """The indices of RL step `step`'s problems (1-based steps) among n: the file is drawn
    without replacement in seeded epochs, each a fresh permutation, so every problem comes
    once per epoch and a step's problems are a fixed function of (seed, step): a resumed
    run draws what an uninterrupted one would, mid-epoch included."""
    first = (step - 1) * per_step
    return [_epoch(n, seed, i // n)[i % n] for i in range(first, first + per_step)]


@functools.lru_cache(maxsize=8)
def _epoch(n: int, seed: int, epoch: int) -> tuple:
    order = list(range(n))
    random.Random(f"epoch/{seed}/{epoch}").shuffle(order)
    return tuple(order)


@dataclass
class Source:
    """Where a run's problems come from: a generated task (its test split for evaluation),
    or a data file, plus any benchmark files to evaluate on; how each problem is asked
    (the prompt format, worked examples, the chat template's keyword arguments)."""
    task: str
    shots: int = 1
    fmt: str = "hint"
    template_kwargs: dict = field(default_factory=dict)
    train: list | None = None                   # a data file's problems; None: generated
    benchmarks: dict = field(default_factory=dict)   # name -> problems
    demo: tuple | None = None     # a data file's worked example (question, solution), --shots 1
    demo_note: str = ""           # where it came from, said once at the start
    files: dict = field(default_factory=dict)   # path -> size and sha256 of the bytes read

    def step(self, step: int, per_step: int, seed: int) -> list:
        """The problems of RL step `step`: a fixed function of (seed, step)."""
        if self.train is None:
            return problems(self.task, per_step, seed=seed * 1_000_003 + step)
        return [self.train[i] for i in epoch_draw(len(self.train), step, per_step, seed)]

    def eval_sets(self, n: int, seed: int) -> dict:
        """name -> held-out problems: n of a generated task's test split (named "", its
        metrics are eval/<metric>), then each benchmark file (eval/<name>/<metric>)."""
        own = {"": problems(self.task, n, seed, "test")} if self.train is None and n else {}
        return {**own, **self.benchmarks}

    def encode(self, tok, problem) -> list[int]:
        msgs = chat(problem, self.task, self.shots, self.fmt, self.demo)  # a file's: its demo
        return tok.encode_chat(msgs, **self.template_kwargs)

    def longest_prompt(self, tok, args, say=print) -> int:
        """Tokens in the longest prompt the run will ask: of 64 problems of each split of
        a generated task, or of the files once prompts over --max-prompt-tokens are
        dropped (with a count) and an overlap of training and benchmark questions is
        reported (say=None: quiet, the other ranks)."""
        say = say or (lambda *_: None)
        if self.demo_note:
            say(self.demo_note)
        if self.train is None and not self.benchmarks:
            return max(len(self.encode(tok, p)) for split in ("train", "test")
                       for p in problems(self.task, 64, args.seed, split))
        longest = self.drop_long(tok, args.max_prompt_tokens, say)
        shared = self.overlap()
        if shared:
            say(shared)
        if self.train is None:   # a generated task with benchmark files beside it
            longest = max(longest, max(len(self.encode(tok, p)) for split in ("train", "test")
                                       for p in problems(self.task, 64, args.seed, split)))
        return longest

    def drop_long(self, tok, limit: int, say=print) -> int:
        """Drop the problems whose prompt is longer than `limit` tokens (the paper:
        1,024), each set counted in one line; the longest prompt kept."""
        longest = 0
        sets = {"--data": self.train} if self.train is not None else {}
        # a question of more bytes than `limit` tokens can stand for is too long without
        # tokenizing it (a 10 MB record would take 17 s and 1.3 GB): each token stands for at
        # most the bytes of the longest one, x4 for what normalisation may fold
        most = 4 * limit * getattr(tok, "widest", math.inf)
        for name, ps in {**sets, **self.benchmarks}.items():
            lengths = [limit + 1 if len(p.question.encode()) > most else len(self.encode(tok, p))
                       for p in ps]
            kept = [p for p, n in zip(ps, lengths) if n <= limit]
            if len(kept) < len(ps):
                say(f"{name}: {len(ps) - len(kept)} of {len(ps)} problems have prompts longer "
                    f"than --max-prompt-tokens {limit}; left out")
            if not kept:
                raise InputError(f"{name}: every prompt is longer than --max-prompt-tokens "
                                 f"{limit}; raise it")
            ps[:] = kept
            longest = max([longest] + [n for n in lengths if n <= limit])
        return longest

    def overlap(self) -> str | None:
        """A line on the training questions that are also in a benchmark, or None."""
        if self.train is None:
            return None
        seen = {" ".join(p.question.split()) for p in self.train}
        for name, ps in self.benchmarks.items():
            both = [p for p in ps if " ".join(p.question.split()) in seen]
            if both:
                return (f"warning: {len(both)} of {len(ps)} questions of {name} are also in --data "
                        f"(first: {both[0].question[:80]!r}); its scores are not held-out")
        return None


def add_data_args(p, train: bool):
    """The flags of where the problems come from and how they are asked, shared by
    train.py and analyze.py (source reads them)."""
    g = p.add_argument_group("problems")
    g.add_argument("--data", default=None,
                   help="a .jsonl (or .parquet) file of problems to use instead of --task: a "
                   "question under question/problem/prompt, an answer under answer/final_answer, "
                   "a MATH solution's last \\boxed{}, or GSM8K's '#### 42'")
    if train:
        g.add_argument("--eval-data", default=None,
                       help="comma-separated benchmark files to evaluate on, each named by its "
                       "file (eval/<name>/avg@n, pass@k); the same record formats")
        g.add_argument("--eval-greedy", action="store_true",
                       help="also a greedy answer per benchmark problem (eval/<name>/greedy_acc)")
        g.add_argument("--max-prompt-tokens", type=int, default=1024,
                       help="file problems with a longer prompt are left out, with a count (the "
                       "paper: 1024)")
    g.add_argument("--example", default=None,
                   help="with --data and --shots 1: a .jsonl file whose first record is the "
                   "worked example (its MATH-style solution if it has one, else 'The answer is "
                   "\\boxed{answer}.'); default: the first record of --data, held out of training")
    g.add_argument("--question-key", default=None, help="the records' question field")
    g.add_argument("--answer-key", default=None, help="the records' answer field")
    g.add_argument("--prompt-format", default="hint", choices=PROMPT_FORMATS,
                   help="hint: the authors' system prompt, the worked example of --shots and a "
                   "\\boxed{} hint (for small models); paper: the authors' system prompt and the "
                   "question alone")
    g.add_argument("--chat-template-kwargs", type=cli.template_kwargs, default={},
                   help="keyword arguments of the chat template, e.g. enable_thinking=false "
                   "(Qwen3 without thinking, as the authors run it)")
    return g


def source(args) -> Source:
    """The Source of train.py's / analyze.py's arguments, every file read and checked."""
    keys = (getattr(args, "question_key", None), getattr(args, "answer_key", None))
    data_file, example = getattr(args, "data", None), getattr(args, "example", None)
    fmt = getattr(args, "prompt_format", "hint")
    if example and not (data_file and args.shots and fmt == "hint"):
        raise InputError(f"--example {example}: it is the worked example of --shots 1 with a "
                         f"--data file (and --prompt-format hint); add --data and --shots 1, or "
                         f"drop --example")
    if data_file and args.shots and fmt == "paper":
        raise InputError("--shots 1 with --prompt-format paper: the paper's format asks the "
                         "question alone, with no worked example; drop one of them")
    files = {}                    # each file's fingerprint, of the bytes parsed
    train = read_problems(data_file, *keys, files) if data_file else None
    paths = cli.file_list(getattr(args, "eval_data", None))
    names = [Path(f).stem for f in paths]
    if len(set(names)) < len(names):
        raise InputError(f"--eval-data {args.eval_data}: two files have the same name; each "
                         f"benchmark is named by its file (eval/<name>/...)")
    src = Source(args.task, args.shots, fmt, getattr(args, "chat_template_kwargs", None) or {},
                 train, {n: read_problems(f, *keys, files) for n, f in zip(names, paths)},
                 files=files)
    if data_file and args.shots:
        worked_example(src, data_file, example, keys)
    return src


def same_question(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def worked_example(src: Source, data_file: str, example: str | None, keys):
    """The worked example of a data file's prompts (--shots 1): the first record of --example
    FILE, else the first record of the --data file, held out; shown with its own solution
    (worked_solution), else one line that boxes its answer. Either way it is never a
    training problem (every record with its question leaves the training set) nor a
    benchmark question (refused: its answer would be in every prompt)."""
    first = read_problems(example, *keys, src.files)[0] if example else src.train[0]
    where = f"{example or data_file}:1"
    src.demo = (first.question, first.solution or f"The answer is \\boxed{{{first.answer}}}.")
    kept = [p for p in src.train if not same_question(p.question, first.question)]
    if not kept:
        raise InputError(f"--data {data_file}: every problem is the worked example's question "
                         f"({where}); --shots 1 needs other problems to train on")
    for name, ps in src.benchmarks.items():
        if any(same_question(p.question, first.question) for p in ps):
            raise InputError(f"the worked example ({where}: {first.question[:60]!r}) is a "
                             f"question of the benchmark {name}; its answer would be in every "
                             f"prompt: name another example with --example FILE")
    held = len(src.train) - len(kept)
    src.train[:] = kept
    held = (f"{held} record{'s' * (held > 1)} with its question held out of --data" if held
            else "no --data record has its question")
    src.demo_note = f"worked example of --shots 1: {where} ({first.question[:60]!r}); {held}"


# -----------------------------------------------------------------------------
# the reward: verl/utils/reward_score/math.py as the authors use it (docs/method.md 8),
# quirks included: "\boxed " anywhere wins over a later "\boxed{}", a normalisation step
# that raises falls back to comparing the raw strings, and any other failure scores 0.

def last_boxed(text: str) -> str | None:
    """The last "\\boxed{...}" (braces balanced) of text, or the text after the last
    "\\boxed " up to a "$"."""
    if "\\boxed " in text:
        tail = text[text.rfind("\\boxed ") + 7:]
        return "\\boxed " + tail[:tail.find("$")] if "$" in tail else "\\boxed " + tail
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return None
    end = closing_brace(text, start)
    return None if end is None else text[start:end + 1]  # unbalanced braces: no answer


def closing_brace(text: str, start: int) -> int | None:
    """The index of the first "}" after `start` that closes every brace opened since, or
    None. With numpy on the UTF-8 bytes: a megabyte of braces costs milliseconds."""
    b = text[start:].encode("utf-8", "surrogatepass")
    a = np.frombuffer(b, dtype=np.uint8)
    opens, closes = a == ord("{"), a == ord("}")
    depth = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32)
    hit = closes & (depth == 0)
    i = int(hit.argmax())
    return start + len(b[:i].decode("utf-8", "surrogatepass")) if hit[i] else None


def remove_boxed(s: str) -> str:
    for left in ("\\boxed ", "\\boxed{"):
        if s.startswith(left):
            if left == "\\boxed{" and not s.endswith("}"):
                break
            return s[len(left):] if left == "\\boxed " else s[len(left):-1]
    raise ValueError(f"not a boxed answer: {s[:30]!r}")


# The two fixes below are the original per-"\\frac" / per-"\\sqrt" loops (split on the
# command, look at the first characters of each part, wrap them in braces), done on the
# array of code points with numpy, so that their cost stays linear and in C even on
# hostile output with a hundred thousand commands (tests/test_tasks.py checks them against
# the loops). Neither command can overlap itself, so its occurrences are exactly the
# loop's split points.

def _codes(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _occurrences(c: np.ndarray, word: str) -> np.ndarray:
    """Start indices of `word` in the code points c."""
    n = len(c) - len(word) + 1
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    hit = np.ones(n, dtype=bool)
    for k, ch in enumerate(word):
        hit &= c[k:k + n] == ord(ch)
    return np.flatnonzero(hit)


def _insert(c: np.ndarray, where: list, chars: str) -> str:
    """c with chars[i] inserted before index where[i] (equal indices keep their order), as
    a str."""
    idx = np.concatenate(where) if where else np.zeros(0, dtype=np.int64)
    vals = (np.concatenate([np.full(len(w), ord(ch), dtype=np.uint32)
                            for w, ch in zip(where, chars)]) if where else idx)
    return np.insert(c, idx, vals.astype(np.uint32)).tobytes().decode("utf-32-le", "surrogatepass")


def _fix_fracs(s: str) -> str:  # \frac12 -> \frac{1}{2}, \frac1{b} -> \frac{1}{b}
    if "\\" not in s:
        return s
    c = _codes(s)
    m = _occurrences(c, "\\frac")
    if not len(m):
        return s
    start, end = m + 5, np.append(m[1:], len(c))           # each part: c[start:end]
    first = c[np.minimum(start, len(c) - 1)]
    bad = np.flatnonzero((end == start) | ((end - start == 1) & (first != ord("{"))))
    if len(bad):
        # the loop stops at the first: IndexError on an empty part, s as is on a short one
        if end[bad[0]] == start[bad[0]]:
            raise IndexError("empty \\frac part")
        return s
    # parts of >= 2 chars that do not start with "{"
    a = start[first != ord("{")]
    two, one = a[c[a + 1] != ord("{")], a[c[a + 1] == ord("{")]
    return _insert(c, [two, two + 1, two + 1, two + 2, one, one + 1], "{}{}{}")


def _fix_sqrt(s: str) -> str:  # \sqrt3 -> \sqrt{3}
    if "\\" not in s:
        return s
    c = _codes(s)
    m = _occurrences(c, "\\sqrt")
    arg = m + 5
    if len(arg) and (arg[-1] >= len(c) or (arg[:-1] == m[1:]).any()):
        raise IndexError("empty \\sqrt part")             # as the loop does on an empty part
    a = arg[c[arg] != ord("{")] if len(arg) else arg
    return _insert(c, [a, a + 1], "{}")


def _fix_a_slash_b(s: str) -> str:
    # "3/4" -> \frac{3}{4}; int() of a non-number raises, as in the original
    if "/" not in s or s.count("/") != 1:
        return s
    a, b = (int(x) for x in s.split("/"))
    return "\\frac{" + str(a) + "}{" + str(b) + "}" if s == f"{a}/{b}" else s


def _replace(s: str, old: str, new: str) -> str:
    """s.replace(old, new), skipped when a character of `old` is absent (memchr)."""
    return s.replace(old, new) if all(ch in s for ch in set(old)) else s


def strip_string(s: str) -> str:
    """The Hendrycks MATH normalisation, step for step; it may raise (see is_equiv)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = _replace(s, old, new)
    if "\\text{ " in s:  # units on the right
        if s.count("\\text{ ") != 1:
            raise ValueError("several \\text{ } units")
        s = s[:s.index("\\text{ ")]
    for old, new in (("\\%", ""), (" .", " 0."), ("{.", "{0.")):
        s = _replace(s, old, new)
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    if "=" in s and s.count("=") == 1 and s.index("=") <= 2:  # "x = 5" -> " 5"
        s = s.split("=")[1]
    s = _replace(_fix_sqrt(s), " ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


def is_equiv(a: str, b: str) -> bool:
    try:
        return strip_string(a) == strip_string(b)
    except (ValueError, IndexError):
        # the original compares the raw strings when the normalisation fails
        return a == b


def reward(response: str, answer: str) -> float:
    """1.0 if the last boxed answer of the response equals the ground truth after
    normalisation, else 0.0. Pure: never raises, never evaluates anything."""
    boxed = last_boxed(response)
    try:
        return float(boxed is not None and is_equiv(remove_boxed(boxed), answer))
    except ValueError:   # remove_boxed: last_boxed found a "\fbox{...}", which is no boxed answer
        return 0.0

"""Tasks and the authors' reward: exact answers, disjoint splits, adversarial responses."""
import pytest

import tasks


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_problems_are_reproducible_and_splits_disjoint(task):
    a, b = tasks.problems(task, 50, seed=3), tasks.problems(task, 50, seed=3)
    assert a == b and tasks.problems(task, 50, seed=4) != a
    train = {p.question for p in tasks.problems(task, 3000, seed=0)}
    test = {p.question
            for p in tasks.problems(task, 10 if task == "add" else 200, seed=0, split="test")}
    assert not train & test
    for p in a:
        assert p.answer.lstrip("-").isdigit()
        assert p.messages()[0]["content"] == tasks.SYSTEM_PROMPT
        assert p.messages()[1]["content"] == f"{p.question} {tasks.FORMAT_HINT}"


@pytest.mark.parametrize("task", sorted(tasks.TASKS))
def test_worked_examples_are_right_and_never_test_questions(task):
    question, solution = tasks.DEMOS[task]
    test = {p.question
            for p in tasks.problems(task, 10 if task == "add" else 500, seed=0, split="test")}
    assert question not in test and tasks.zlib.crc32(question.encode()) % tasks.TEST_EVERY != 0
    answer = solution.split("\\boxed{")[1].rstrip("}.")
    assert tasks.reward(solution, answer) == 1.0
    p = tasks.problems(task, 1, seed=0)[0]
    chat = tasks.chat(p, task, shots=1)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "user"]
    assert (chat[1]["content"] == f"{question} {tasks.FORMAT_HINT}"
            and chat[2]["content"] == solution)
    assert chat[3] == p.messages()[1] and tasks.chat(p, task) == p.messages()
    with pytest.raises(ValueError, match="--shots must be 0 or 1"):
        tasks.chat(p, task, shots=2)


def test_answers_are_right():
    for p in tasks.problems("arithmetic", 200, seed=1) + tasks.problems("add", 50, seed=1):
        expr = p.question.removeprefix("What is ").removesuffix("?")
        a, op, b, *rest = expr.split()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        if rest:  # "a + b * c"
            value = int(a) + int(b) * int(rest[1])
        assert str(value) == p.answer, p


@pytest.mark.parametrize("response,answer,expected", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{1} no wait \\boxed{2}", "2", 1.0),                 # the last box counts
    ("\\boxed{1} no wait \\boxed{2}", "1", 0.0),
    ("The answer is 42.", "42", 0.0),                            # no box, no reward
    # Hendrycks normalisation on both sides
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("\\boxed{3/4}", "\\frac{3}{4}", 1.0),
    ("\\boxed{x = 5}", "5", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{ 42 }", "42", 1.0),
    ("\\boxed{a{b}c}", "a{b}c", 1.0),                            # nested braces
    ("\\boxed{42", "42", 0.0),                                   # unbalanced
    ("\\boxed 7$ and later \\boxed{8}", "7", 1.0),                # the authors' "\boxed " rule wins
    # a failing normalisation compares raw strings never evaluated
    ("\\boxed{x/2}", "x/2", 1.0),
    ("\\boxed{__import__('os').system('echo hi')}", "0", 0.0),
    ("\\fbox{7}", "7", 0.0),                                     # found, but no boxed answer
    # int() over its digit limit: raw strings compared
    ("\\boxed{9/" + "9" * 5000 + "}", "1", 0.0),
])
def test_reward(response, answer, expected):
    assert tasks.reward(response, answer) == expected


@pytest.mark.parametrize("response", [
    "\\boxed{" + "9" * 200_000 + "}",          # a huge number
    "x" * 1_000_000,                           # a megabyte of text
    "\\boxed{" * 100_000,                      # a megabyte of unclosed boxes
    "\\boxed{" + "{" * 50_000 + "}" * 50_000 + "}",
    "\\frac" * 10_000 + "\\boxed{\\frac}",
    "\\boxed{\\sqrt}",
    "\x00\uffff\\boxed{\ud800}",
])
def test_reward_never_raises(response):
    assert tasks.reward(response, "9") in (0.0, 1.0)


@pytest.mark.parametrize("task,digits,operands",
                         [("sum2", 2, 2), ("sum3", 3, 2), ("sum4", 4, 2), ("sum2x3", 2, 3)])
def test_sum_levels(task, digits, operands):
    probs = tasks.problems(task, 300, seed=5)
    for p in probs:
        xs = [int(x) for x in p.question.removeprefix("What is ").removesuffix("?").split(" + ")]
        assert (len(xs) == operands and all(len(str(x)) == digits for x in xs)
                and p.answer == str(sum(xs)))
    # the held-out split is large: hundreds of distinct questions, so 5-point differences are
    # measurable
    assert len({p.question for p in tasks.problems(task, 400, seed=0, split="test")}) > 300

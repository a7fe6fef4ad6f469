"""
Writes the example data files of this folder from the project's own generated tasks (tasks.py), one
file per record style that train.py --data / --eval-data reads:

    train.jsonl        {"question", "answer"}: 240 sum and word problems of the training splits
    heldout.jsonl      {"question", "answer"}: 64 sums of the test split, the held-out accuracy
                       of README's data recipe (the model can learn them; see README)
    example.jsonl      {"question", "solution"}: the worked example of --shots 1 (--example), a
                       training-split sum that is in no other file
    math_style.jsonl   {"problem", "solution"}: 40 test-split problems, the answer the
                       solution's last \\boxed{} (MATH, MATH-500)
    gsm8k_style.jsonl  {"question", "answer"}: 40 test-split problems, the answer after "####"
                       (GSM8K)

    python examples/make.py      # rewrites the three files; the same files every time
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import tasks  # noqa: E402


def write(name: str, records: list):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def main():
    train = tasks.problems("sum2", 160, seed=0) + tasks.problems("word", 80, seed=0)
    write("train.jsonl", [{"question": p.question, "answer": p.answer} for p in train])
    demo, solution = tasks.DEMOS["sum2"]
    write("example.jsonl", [{"question": demo, "solution": solution}])
    held = tasks.problems("sum2", 64, seed=0, split="test")
    write("heldout.jsonl", [{"question": p.question, "answer": p.answer} for p in held])
    math = tasks.problems("sum2x3", 40, seed=0, split="test")
    write("math_style.jsonl", [{"problem": p.question, "solution": f"Adding the numbers gives "
                                f"$\\boxed{{{p.answer}}}$."} for p in math])
    gsm = tasks.problems("word", 40, seed=1, split="test")
    write("gsm8k_style.jsonl", [{"question": p.question,
                                 "answer": f"Working it out step by step.\n#### {p.answer}"}
                                for p in gsm])


if __name__ == "__main__":
    main()

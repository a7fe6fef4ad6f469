"""Problems from files (tasks.read_problems, infra/data.py): the three record styles, the answer
extraction, seeded epochs, the length filter, pass@k, and one file:line error per bad record."""
import itertools
import json
import math
from pathlib import Path

import pytest

import tasks
from infra import runs
import train
import analyze as evaluation
from infra.errors import InputError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def jsonl(tmp_path, *records, name="d.jsonl") -> Path:
    f = tmp_path / name
    f.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return f


def test_the_three_record_styles(tmp_path):
    f = jsonl(tmp_path,
              {"question": "What is 2 + 2?", "answer": "4"},                        # plain
              {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},  # MATH
              {"question": "Sum?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},         # GSM8K
              {"prompt": "Three?", "final_answer": 3},                              # a number
              {"problem": "P?", "solution": "a \\boxed{1} then \\boxed{2}", "answer": "2"})
    got = [(p.question, p.answer) for p in tasks.read_problems(f)]
    assert got == [("What is 2 + 2?", "4"), ("Half of 1?", "\\frac{1}{2}"), ("Sum?", "7"),
                   ("Three?", "3"), ("P?", "2")]
    # named fields win over the detection
    g = jsonl(tmp_path, {"q": "Why?", "gold": "because", "answer": "no"}, name="k.jsonl")
    assert tasks.read_problems(g, "q", "gold")[0] == tasks.Problem("Why?", "because")


def test_the_shipped_examples_read_in_each_style():
    sizes = {f.stem: len(tasks.read_problems(f)) for f in sorted(EXAMPLES.glob("*.jsonl"))}
    assert sizes == {"example": 1, "gsm8k_style": 40, "heldout": 64, "math_style": 40, "train": 240}
    # and their answers are what the reward accepts
    for f in EXAMPLES.glob("*.jsonl"):
        for p in tasks.read_problems(f)[:5]:
            assert tasks.reward(f"so \\boxed{{{p.answer}}}", p.answer) == 1.0


@pytest.mark.parametrize("lines,fragment", [
    (['{"question": "a", "answer": "1"}', "{not json"], "d.jsonl:2: not valid JSON"),
    (['{"answer": "1"}'], "d.jsonl:1: no question (looked for 'question', 'problem', 'prompt')"),
    (['{"question": "a"}'], "d.jsonl:1: no answer"),
    (['{"question": "a", "answer": ""}'], "d.jsonl:1: the answer ('answer') is \"\""),
    (['{"question": ["a"], "answer": "1"}'], "d.jsonl:1: the question ('question') is [\"a\"]"),
    (['[1, 2]', '{"question": "a", "answer": "1"}'], "d.jsonl:1: a JSON list, not an object"),
    # a whole-file JSON array (as many datasets ship) is not JSON Lines: said so
    (['[', '{"question": "a", "answer": "1"},', '{"question": "b", "answer": "2"}', ']'],
     "d.jsonl: one JSON array of 2 items, not JSON Lines; write one JSON object per line"),
    (['{"problem": "a", "solution": "no box \\\\boxed{"}'], "d.jsonl:1: the answer's last"),
    (['{"question": "a", "answer": "work ####  "}'], "d.jsonl:1: the answer after '####' is empty"),
    ([], "d.jsonl: empty"),
    (['{"question": "a", "answer": NaN}'], "d.jsonl:1: the answer ('answer') is NaN"),
    (['{"question": "a", "answer": -Infinity}'], "d.jsonl:1: the answer ('answer') is -Infinity"),
    # a worked solution with no marked final answer would be compared whole: refused
    (['{"problem": "a", "solution": "add them: it is 7"}'],
     "d.jsonl:1: the solution has no \\boxed{} or '####' final answer"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, lines, fragment):
    f = jsonl(tmp_path, *lines)
    with pytest.raises(InputError) as e:
        tasks.read_problems(f)
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_csv_file_is_named_as_such(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("question,answer\nWhat is 2 + 2?,4\n")
    with pytest.raises(InputError, match="d.csv: a CSV file; the records must be JSON Lines"):
        tasks.read_problems(f)


def test_a_byte_order_mark_and_crlf_lines_are_read(tmp_path):
    """UTF-8 saved with a byte-order mark and Windows line ends (as some editors write it)."""
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"question": "a", "answer": "1"}\r\n'
                  b'{"question": "b", "answer": 2}\r\n')
    assert tasks.read_problems(f) == [tasks.Problem("a", "1"), tasks.Problem("b", "2")]
    # a solution named as the answer field is taken as it is
    g = jsonl(tmp_path, {"problem": "a", "solution": "7"}, name="g.jsonl")
    assert tasks.read_problems(g, answer_key="solution") == [tasks.Problem("a", "7")]


def test_bytes_that_are_not_utf8_are_named_by_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"question": "a", "answer": "1"}\n{"question": "caf\xe9", "answer": "2"}\n')
    with pytest.raises(InputError, match=r"d.jsonl:2: byte 0xe9 is not UTF-8"):
        tasks.read_problems(f)


def test_json_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029 and U+0085 are text inside a JSON string (str.splitlines would cut there)."""
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "a\u2028b\u2029c\x85d", "answer": "1"},
                            ensure_ascii=False) + "\n", encoding="utf-8")
    assert tasks.read_problems(f) == [tasks.Problem("a\u2028b\u2029c\x85d", "1")]


def test_numeric_answers_are_written_as_numbers():
    """4.0 (pandas' integer column with a gap) is "4", so \\boxed{4} scores; a decimal too."""
    from decimal import Decimal
    got = [tasks._text({"answer": v}, "w", None, ("answer",), "answer")
           for v in (4.0, 4, -3.0, 2.5, Decimal("4.00"), Decimal("2.50"), Decimal("100"))]
    assert got == ["4", "4", "-3", "2.5", "4", "2.5", "100"]
    assert tasks.reward("so \\boxed{4}", got[0]) == 1.0


@pytest.mark.parametrize("value,fragment", [
    (b"raw", "the question ('question') is bytes b'raw', not text or a number"),
    ("x \ud83d y", "the question has a lone surrogate (\\ud83d at character 2)"),
])
def test_odd_values_are_refused_in_one_line(value, fragment):
    """Bytes (a parquet binary column) and half an emoji: one line, whatever the type."""
    with pytest.raises(InputError) as e:
        tasks._text({"question": value}, "d.parquet:row 1", None, ("question",), "question")
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_lone_surrogate_in_a_file_is_named_by_line(tmp_path):
    f = jsonl(tmp_path, {"question": "a", "answer": "1"}, '{"question": "\\ud83d", "answer": 1}')
    with pytest.raises(InputError, match=r"d.jsonl:2: the question has a lone surrogate"):
        tasks.read_problems(f)


def test_a_folder_or_a_pipe_is_named_as_such(tmp_path):
    import os
    with pytest.raises(InputError, match="a folder, not a data file"):
        tasks.read_problems(tmp_path)
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(InputError, match=r"not a regular file \(a pipe or a device\)"):
        tasks.read_problems(tmp_path / "pipe.jsonl")
    with pytest.raises(InputError, match="no such data file"):
        tasks.read_problems(tmp_path / "missing.jsonl")


def test_parquet_needs_pyarrow_or_reads(tmp_path):
    f = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        f.write_bytes(b"PAR1")
        with pytest.raises(InputError, match="reading .parquet needs pyarrow"):
            tasks.read_problems(f)
        return
    pq.write_table(pa.table({"problem": ["a?"], "answer": ["1"]}), f)
    assert tasks.read_problems(f) == [tasks.Problem("a?", "1")]
    # a decimal128 answer is a number; a binary question is refused in one line
    from decimal import Decimal
    pq.write_table(pa.table({"problem": ["a?", "b?"], "answer": pa.array(
        [Decimal("4.00"), Decimal("2.50")], pa.decimal128(5, 2))}), f)
    assert [p.answer for p in tasks.read_problems(f)] == ["4", "2.5"]
    pq.write_table(pa.table({"problem": pa.array([b"raw"], pa.binary()), "answer": ["1"]}), f)
    with pytest.raises(InputError, match=r"d.parquet:row 1: the question \('problem'\) is bytes"):
        tasks.read_problems(f)


def test_epochs_draw_every_problem_once_and_resume_exactly():
    """13 problems, 4 a step: each epoch is a permutation of all 13, the steps run on across epoch
    ends, and step s is the same whether or not the steps before it ran (what --resume needs)."""
    n, per = 13, 4
    drawn = [i for s in range(1, 14) for i in tasks.epoch_draw(n, s, per, seed=7)]   # 4 epochs
    for e in range(4):
        assert sorted(drawn[e * n:(e + 1) * n]) == list(range(n))
    assert drawn[:n] != drawn[n:2 * n]                           # a fresh order each epoch
    assert tasks.epoch_draw(n, 9, per, seed=7) == drawn[32:36]   # mid-epoch, computed alone
    assert tasks.epoch_draw(n, 1, per, seed=8) != drawn[:4]      # the seed changes the order


def test_prompts_over_the_limit_are_left_out_with_a_count(tmp_path):
    class Words:   # a tokenizer of whitespace words
        def encode_chat(self, messages, **kw):
            return " ".join(m["content"] for m in messages).split()
    long, short = {"question": "x " * 50, "answer": "1"}, {"question": "x", "answer": "1"}
    f = jsonl(tmp_path, short, long, short)
    src = tasks.Source("add", 0, "paper", {}, tasks.read_problems(f))
    said = []
    longest = src.drop_long(Words(), 20, said.append)
    assert len(src.train) == 2 and longest == len(tasks.SYSTEM_PROMPT.split()) + 1
    assert said == ["--data: 1 of 3 problems have prompts longer than --max-prompt-tokens 20; "
                    "left out"]


def test_a_training_question_in_a_benchmark_is_reported(tmp_path):
    train_f = jsonl(tmp_path, {"question": "What is  2+2?", "answer": "4"},
                    {"question": "b", "answer": "1"}, name="t.jsonl")
    bench = jsonl(tmp_path, {"problem": "What is 2+2?", "answer": "4"},
                  {"problem": "c", "answer": "2"}, name="b.jsonl")
    src = tasks.Source("add", 0, "paper", {}, tasks.read_problems(train_f),
                       {"b": tasks.read_problems(bench)})
    assert src.overlap().startswith("warning: 1 of 2 questions of b are also in --data")


def test_eval_data_ignores_blanks_around_its_commas(tmp_path, monkeypatch):
    """--eval-data "a.jsonl, b.jsonl" (as people type lists) names a.jsonl and b.jsonl, and a
    run records them as such."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.jsonl", "b.jsonl"):
        jsonl(tmp_path, {"question": f"{name}?", "answer": "1"}, name=name)
    src = tasks.source(data_args(eval_data="a.jsonl, b.jsonl ,"))
    assert list(src.benchmarks) == ["a", "b"]
    assert sorted(src.files) == ["a.jsonl", "b.jsonl"]
    args = data_args(eval_data=" a.jsonl , b.jsonl", data=None)
    assert runs.data_inputs(args) == [("--eval-data", "a.jsonl"), ("--eval-data", "b.jsonl")]


def test_pass_at_k_is_the_fraction_of_k_subsets_with_a_right_answer():
    for n in range(1, 9):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert math.isclose(evaluation.pass_at_k(n, c, k), brute), (n, c, k)


def test_the_paper_prompt_format_is_the_question_alone():
    p = tasks.Problem("What is 1 + 1?", "2")
    assert tasks.chat(p, None, 0, "paper") == [
        {"role": "system", "content": tasks.SYSTEM_PROMPT},
        {"role": "user", "content": "What is 1 + 1?"}]
    assert tasks.chat(p, "add", 1, "hint")[-1]["content"].endswith(tasks.FORMAT_HINT)


def run_on_files(model, out, *extra):
    train.main(["--model", str(model), "--out", str(out), "--data", str(EXAMPLES / "train.jsonl"),
                "--eval-data", str(EXAMPLES / "math_style.jsonl"), "--prompts-per-step", "2",
                "--group-size", "4", "--mini-batches", "2", "--micro-batch-size", "4",
                "--max-new-tokens", "6", "--eval-samples", "2", "--eval-every", "2",
                "--internal-layer", "2", "--internal-steps", "1", "--lr", "1e-3",
                "--save-every", "1", *extra])
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def untimed(rows):
    return [{k: v for k, v in r.items() if k not in train_timings} for r in rows]


train_timings = ("step_time", "tokens_per_s", "peak_memory_mb", "eval_time")


def test_training_on_files_evaluates_each_benchmark_and_resumes_exactly(tiny_chat_model, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))
    whole = run_on_files(tiny_chat_model, tmp_path / "whole", "--steps", "3")
    assert {"eval/math_style/avg@2", "eval/math_style/pass@1", "eval/math_style/pass@2"} <= set(
        whole[0]) and "eval/greedy_acc" not in whole[0]
    run_on_files(tiny_chat_model, tmp_path / "cut", "--steps", "2")
    train.main(["--resume", str(tmp_path / "cut"), "--steps", "3"])
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert untimed(cut) == untimed(whole)
    saved = json.loads((tmp_path / "whole" / "args.json").read_text())
    assert saved["shots"] == 0 and Path(saved["data"]).is_absolute()


def test_a_bad_data_file_is_refused_before_the_model_loads(tiny_chat_model, tmp_path,
                                                           monkeypatch):
    from infra import cli
    from model import Transformer

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the data file was checked")
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(no_load))
    bad = jsonl(tmp_path, {"question": "a", "answer": "1"}, {"question": "b"})
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--model", str(tiny_chat_model), "--out", str(tmp_path / "run"),
                             "--data", str(bad)])
    assert str(e.value.code) == (f"error: {bad}:2: no answer (looked for 'answer', "
                                 f"'final_answer', 'solution'); name the field with --answer-key")
    assert not (tmp_path / "run").exists()


def test_analyze_measures_the_flow_on_a_files_problems(tiny_chat_model, tmp_path):
    """analyze.py --data: the model answers a seeded draw of the file's problems, asked in the
    paper's format, and the entropy flow is computed on those answers."""
    import analyze
    out = tmp_path / "a"
    analyze.main(["--model", str(tiny_chat_model), "--out", str(out), "--data",
                  str(EXAMPLES / "gsm8k_style.jsonl"), "-n", "2", "--max-new-tokens", "4",
                  "--prompt-format", "paper", "--chat-template-kwargs", "enable_thinking=false"])
    result = json.loads((out / "entropy.json").read_text())
    assert result["num_responses"] == 2 and len(result["layers"]) == 3


def test_chat_template_kwargs_are_parsed_into_values():
    from infra import cli
    assert cli.template_kwargs("enable_thinking=false, n=3,x=1.5,name=q") == {
        "enable_thinking": False, "n": 3, "x": 1.5, "name": "q"}
    with pytest.raises(Exception, match="not name=value"):
        cli.template_kwargs("enable_thinking")


def test_a_huge_question_is_left_out_without_tokenizing_it(tmp_path, default_model_dir,
                                                            monkeypatch):
    """A 10 MB question cannot fit 1,024 tokens of at most `widest` bytes each: it is counted out
    at once, not tokenized (17 s and 1.3 GB before); the others are tokenized as ever."""
    from tokenizer import Tokenizer
    tok = Tokenizer(default_model_dir)
    f = jsonl(tmp_path, {"question": "word " * 2_000_000, "answer": "1"},
              {"question": "What is 2 + 2?", "answer": "4"})
    src = tasks.Source("add", 0, "hint", {}, tasks.read_problems(f))
    encoded, real = [], tasks.Source.encode
    monkeypatch.setattr(tasks.Source, "encode",
                        lambda self, t, p: encoded.append(len(p.question)) or real(self, t, p))
    said = []
    longest = src.drop_long(tok, 1024, said.append)
    assert encoded == [len("What is 2 + 2?")] and [p.answer for p in src.train] == ["4"]
    assert longest == len(real(src, tok, src.train[0]))
    assert said == ["--data: 1 of 2 problems have prompts longer than --max-prompt-tokens 1024; "
                    "left out"]
    assert tok.widest * 4 * 1024 < 10_000_000


# -----------------------------------------------------------------------------
# the worked example of a data file's prompts (--shots 1)

def data_args(**kw):
    import argparse
    base = dict(task="add", shots=1, prompt_format="hint", data=None, eval_data=None,
                example=None, question_key=None, answer_key=None, chat_template_kwargs={})
    return argparse.Namespace(**{**base, **kw})


def test_the_held_out_example_is_never_trained_on_nor_evaluated(tmp_path):
    """--shots 1 with --data alone: the file's first record is the worked example, and every
    record with its question (a duplicate with other spacing too) leaves the training set; no
    step of many epochs draws it, and every prompt shows it as the earlier turn."""
    rows = [{"question": "What is 72 + 80?", "answer": "152"},
            *({"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(9)),
            {"question": "What is  72 +  80? ", "answer": "152"}]
    f = jsonl(tmp_path, *rows)
    bench = jsonl(tmp_path, {"question": "What is 3 + 3?", "answer": "6"}, name="b.jsonl")
    src = tasks.source(data_args(data=str(f), eval_data=str(bench)))
    assert src.demo == ("What is 72 + 80?", "The answer is \\boxed{152}.")
    assert len(src.train) == 9
    said = []
    src.longest_prompt(WordTokenizer(), data_args(max_prompt_tokens=1000, seed=0), said.append)
    assert said[0].startswith(f"worked example of --shots 1: {f}:1 ('What is 72 + 80?'); 2 "
                              f"records with its question held out of --data")
    drawn = {p.question for s in range(1, 200) for p in src.step(s, 4, seed=3)}
    assert drawn == {f"What is {i} + 1?" for i in range(9)}
    for problems in [src.train, *src.eval_sets(8, 0).values()]:
        for p in problems:
            msgs = tasks.chat(p, None, 1, "hint", src.demo)
            assert msgs[1]["content"].startswith("What is 72 + 80?")       # the example's turn
            assert msgs[2]["content"] == "The answer is \\boxed{152}."
            assert not tasks.same_question(msgs[-1]["content"].removesuffix(
                " " + tasks.FORMAT_HINT), "What is 72 + 80?")


def test_an_example_file_gives_the_worked_example(tmp_path):
    """--example FILE: its first record's MATH-style solution is shown as is; a --data record
    with the same question is held out; a GSM8K solution is shown as one boxed line."""
    f = jsonl(tmp_path, {"question": "a?", "answer": "1"}, {"question": "b?", "answer": "2"},
              {"question": "Half of 1?", "answer": "1/2"})
    ex = jsonl(tmp_path, {"problem": "Half of 1?", "solution": "1/2 is $\\boxed{\\frac12}$."},
               name="ex.jsonl")
    src = tasks.source(data_args(data=str(f), example=str(ex)))
    assert src.demo == ("Half of 1?", "1/2 is $\\boxed{\\frac12}$.")
    assert [p.question for p in src.train] == ["a?", "b?"]
    gsm = jsonl(tmp_path, {"question": "Sum?", "answer": "3 + 4 = 7\n#### 7"}, name="g.jsonl")
    src = tasks.source(data_args(data=str(f), example=str(gsm)))
    assert src.demo == ("Sum?", "The answer is \\boxed{7}.") and len(src.train) == 3


@pytest.mark.parametrize("kw, fragment", [
    (dict(shots=0, example="EX"), "--example EX: it is the worked example of --shots 1"),
    (dict(data=None, example="EX"), "--example EX: it is the worked example of --shots 1"),
    (dict(prompt_format="paper"), "--shots 1 with --prompt-format paper"),
    (dict(eval_data="BENCH"), "the worked example (DATA:1: 'What is 9 + 9?') is a question of "
                              "the benchmark b"),
    (dict(example="ONLY"), "every problem is the worked example's question (ONLY:1)"),
])
def test_a_worked_example_that_cannot_be_is_refused(tmp_path, kw, fragment):
    data = jsonl(tmp_path, {"question": "What is 9 + 9?", "answer": "18"})
    paths = {"DATA": str(data), "EX": str(data),
             "BENCH": str(jsonl(tmp_path, {"question": "What is 9  + 9?", "answer": "18"},
                                name="b.jsonl")),
             "ONLY": str(jsonl(tmp_path, {"question": "What is 9 + 9?", "answer": "18"},
                               name="o.jsonl"))}
    args = {"data": "DATA", **kw}
    args = {k: paths.get(v, v) if isinstance(v, str) else v for k, v in args.items()}
    if kw.get("eval_data"):     # a file with a second problem, so that training has one
        data.write_text(data.read_text() + json.dumps({"question": "x", "answer": "1"}) + "\n")
    with pytest.raises(InputError) as e:
        tasks.source(data_args(**args))
    for name, path in paths.items():
        fragment = fragment.replace(name, path)
    assert fragment in str(e.value)


class WordTokenizer:   # a tokenizer of whitespace words
    widest = 10**6

    def encode_chat(self, messages, **kw):
        return " ".join(m["content"] for m in messages).split()


def test_a_run_with_an_example_file_resumes_from_another_folder(tiny_chat_model, tmp_path,
                                                                 monkeypatch):
    """--example is stored absolute and fingerprinted: a resume from another working folder finds
    it, and one after the file changed is refused naming it."""
    import os
    from infra import cli
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))
    monkeypatch.chdir(tmp_path)
    ex = jsonl(tmp_path, {"question": "What is 47 + 38?",
                          "solution": "47 + 38 = 85. The answer is \\boxed{85}."}, name="ex.jsonl")
    run_on_files(tiny_chat_model, tmp_path / "run", "--steps", "1", "--shots", "1", "--example",
                 "ex.jsonl")
    saved = json.loads((tmp_path / "run" / "args.json").read_text())
    assert saved["example"] == str(ex) and str(ex) in saved["data_files"]
    os.chdir(tmp_path.parent)
    train.main(["--resume", str(tmp_path / "run"), "--steps", "2"])
    ex.write_text(ex.read_text().replace("47", "46"))
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--resume", str(tmp_path / "run"), "--steps", "3"])
    assert str(ex) in str(e.value.code) and "--accept-data-change" in str(e.value.code)

"""experiments/report.py on a small synthetic runs folder: tables, spreads over seeds, plots,
copies."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_run(d: Path, algo: str, seed: int, rewards: list[float], layer: int = 29,
             steps: int | None = None,
             marker: bool = True):
    """A finished run of len(rewards) steps; `steps` sets its --steps, `marker` writes run.sh's
    .done."""
    d.mkdir(parents=True)
    args = {"algo": algo, "seed": seed, "eval_samples": 4, "internal_steps": 1,
            "internal_layer": "auto"}
    (d / "args.json").write_text(json.dumps({**args, **({"steps": steps} if steps else {})}))
    rows = [{"step": 0, "eval/greedy_acc": 0.5, "eval/avg@4": 0.25, "eval/pass@4": 0.5}]
    for step, r in enumerate(rewards, 1):
        internal = algo == "bupo" and step == 1
        row = {"step": step, "phase": "internal" if internal else "full",
               "policy_layer": layer if internal else 30,
               "reward": r, "frac_reward_zero_std": 0.5, "entropy": 0.5,
               "completions/mean_length": 20.0,
               "step_time": 10.0, "tokens_per_s": 5.0, "peak_memory_mb": 100.0}
        if algo == "bupo":
            row.update({"internal/entropy": 0.1, "internal/kl_to_policy": 20.0,
                        "internal/cos_to_top": 0.6})
        rows.append(row)
    rows[-1].update({"eval/greedy_acc": rewards[-1], "eval/avg@4": rewards[-1], "eval/pass@4": 1.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if marker:
        (d / ".done").touch()


def test_report_tables(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, (g, b, l8) in enumerate([(0.5, 0.6, 0.5), (0.6, 0.6, 0.7), (0.7, 0.9, 0.8)]):
        fake_run(runs / f"grpo-s{seed}", "grpo", seed, [0.2, g])
        fake_run(runs / f"bupo-s{seed}", "bupo", seed, [0.3, b])
        fake_run(runs / f"bupo-l8-s{seed}", "bupo", seed, [0.3, l8], layer=8)
    # stalls at steps 2-4
    fake_run(runs / "bupo-l4-s0", "bupo", 0, [0.1, 0.0, 0.0, 0.0, 0.4, 0.0], layer=4)
    for seed in (0, 1):
        # the s_inter sweep at l = 8, two seeds
        fake_run(runs / f"bupo-l8-inter2-s{seed}", "bupo", seed, [0.3, 0.6], layer=8)
    (runs / "unfinished-s0").mkdir()
    (runs / "unfinished-s0" / "args.json").write_text("{}")
    # a run mid-write
    (runs / "unfinished-s0" / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, "rew')
    # killed before it wrote its arguments
    (runs / "started-s0").mkdir()
    (runs / "started-s0" / "metrics.jsonl").write_text("")
    layers = [{"layer": l, "H_resid": 11.0 - l, "dH_mlp": 0.1 if l < 2 else -0.1, "dH_attn": 0.0}
              for l in (1, 2, 3, 4)]
    (runs / "flow-x").mkdir()
    (runs / "flow-x" / "entropy.json").write_text(json.dumps({
        "model": "x", "num_layers": 4, "num_tokens": 10, "layers": layers, "H_policy": 7.0,
        "boundary_layer": 1, "internal_layer": 1, "internal_layer_rule": "boundary"}))
    kl = [{"layer": l, "H_resid": 1.0, "dH_mlp": -0.1, "dH_attn": 0.0, "KL_resid": k}
          for l, k in ((1, 9.0), (2, 3.5), (3, 6.0), (4, 0.0))]
    (runs / "flow-y").mkdir()
    (runs / "flow-y" / "entropy.json").write_text(json.dumps({
        "model": "y", "num_layers": 4, "num_tokens": 10, "layers": kl, "H_policy": 1.0,
        "boundary_layer": None, "internal_layer": 2, "internal_layer_rule": "closest"}))
    done = subprocess.run([sys.executable, "experiments/report.py", "--runs", str(runs), "--out",
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (out / "results.md").read_text()
    # grpo's final greedy accuracies 0.5, 0.6, 0.7: mean 0.6, SE 0.1 / sqrt(3) = 0.058; 2 steps of
    # 10 s = 0.33 min
    assert ("| grpo | GRPO | 3 | 0.500 ± 0.000 | 0.600 ± 0.058 | 0.250 ± 0.000 | 0.600 ± 0.058 |"
            in text)
    assert ("| bupo | BuPO l=29 (auto), s_inter=1 | 3 |" in text
            and "| bupo-l8 | BuPO l=8 (auto), s_inter=1 | 3 |" in text)
    # bupo - grpo per seed: 0.1, 0.0, 0.2 -> mean 0.1, SE 0.0577, t(2) = 4.303: [-0.148, +0.348]; 2
    # better, 0 worse
    assert "| bupo − grpo | 0, 1, 2 | +0.100 [-0.148, +0.348] |" in text and "| 2 / 0 |" in text
    assert "| bupo-l8 − bupo | 0, 1, 2 | -0.033 [" in text
    assert "| flow-x | 4 | 10 | 10.00 |" in text and "1 (boundary)" in text
    # flow-y: its least KL, the KL at L-1, the project's closest layer, and auto's layer by the
    # current rule (the file's own "closest" pick is not what auto does now)
    assert "| none | 3.5 at l = 2 | 6.0 | 2 | 3 (penultimate) |" in text
    assert "Not finished, left out: unfinished-s0" in text
    # the s_inter sweep against s_inter = 4 at its layer, and nothing else against that run: per
    # seed +0.1, -0.1, t(1) = 12.706, SD 0.141: [-1.271, +1.271]
    part = text[text.index("### A longer phase 1 against s_inter = 4 at the same layer (bupo-l8)"):]
    part = part[:part.index("###", 3)]
    assert ("| bupo-l8-inter2 − bupo-l8 | 0, 1 | +0.000 [-1.271, +1.271] |" in part
            and "| 1 / 1 |" in part)
    assert "grpo − bupo-l8" not in part and "bupo − bupo-l8" not in part
    # every run on its own line: accuracies at each evaluation, mean train reward, wall minutes,
    # peak GiB
    assert ("| grpo-s1 | GRPO | 1 | 0.500 / 0.600 | 0.250 / 0.600 | 0 / 2 | 0.400 | 0 | 0 | 0.1 |"
            in text)
    # a stall (3+ steps in a row at reward 0, where GRPO has no gradient): its longest stretch, and
    # the count per configuration
    assert "| 0 / 6 | 0.083 | 3 | 1 | 0.1 |" in text and "| 0.000 | 0.083 | 1 | 1 | 0.1 |" in text
    assert "| 0.600 ± 0.058 | 0.400 ± 0.029 | 0 | 0 ± 0 | 0.1 |" in text        # grpo: no stall
    # phase 1 (step 1) and the 5 steps after (step 2), next to GRPO on the same steps and seeds
    assert "| 0.30 ± 0.00 (GRPO 0.20) | 0.70 ± 0.10 (GRPO 0.60) |" in text
    assert text.index("| grpo |") < text.index("| bupo |") < text.index("| bupo-l8 |")
    for f in ("flow.png", "training.png", "layers.png", "inter.png", "dynamics.png",
              "runs/grpo-s1/metrics.jsonl",
              "runs/flow-x/entropy.json"):
        assert (out / f).stat().st_size > 0


def test_report_cost(tmp_path):
    """--cost: one table of s/step per configuration and phase, from the runs of
    experiments/cost.sh."""
    runs, out = tmp_path / "cost", tmp_path / "out"
    fake_run(runs / "grpo", "grpo", 0, [0.2, 0.5, 0.7])
    fake_run(runs / "bupo", "bupo", 0, [0.2, 0.5, 0.7])
    done = subprocess.run([sys.executable, "experiments/report.py", "--cost", str(runs), "--out",
                           str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (out / "cost.md").read_text()
    assert ("| bupo | internal | 1 | 10 | 5.0 | 100 |" in text
            and "| grpo | full | 3 | 10 ± 0 | 5.0 ± 0.0 | 100 |" in text)
    assert (out / "cost" / "grpo" / "metrics.jsonl").exists()
    missing = subprocess.run([sys.executable, "experiments/report.py", "--cost",
                              str(tmp_path / "nope"), "--out",
                              str(out)], cwd=ROOT, capture_output=True, text=True)
    assert (missing.returncode != 0 and missing.stderr.startswith("error: --cost")
            and "Traceback" not in missing.stderr)


def test_layer_rule_script(tmp_path, tiny_chat_model):
    """experiments/layer_rule.py: train.py's quick analysis per seed, and the rule applied to its
    KL."""
    out = tmp_path / "rule.json"
    done = subprocess.run([sys.executable, "experiments/layer_rule.py", "--model",
                           str(tiny_chat_model), "-n", "2", "--max-new-tokens", "4",
                           "--seeds", "0", "1", "--device", "cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    sys.path.insert(0, str(ROOT / "experiments"))
    from layer_rule import closest_layer
    assert [r["seed"] for r in result["seeds"]] == [0, 1] and result["command"].endswith(str(out))
    for r in result["seeds"]:
        kl = r["KL_resid"]
        assert (len(kl) == result["num_layers"] and kl[-1] == 0
                and r["closest_layer"] == closest_layer(kl))
        L, b = result["num_layers"], r["boundary_layer"]
        # not the KL's
        assert r["auto"] == ([b, "boundary"] if b is not None and b < L else [L - 1, "penultimate"])
        assert r["least_kl_layer"] == 1 + min(range(len(kl) - 1), key=kl.__getitem__)
        assert f"seed {r['seed']}: " in done.stdout
    bad = subprocess.run([sys.executable, "experiments/layer_rule.py", "--model",
                          str(tmp_path / "none")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and bad.stderr.startswith("error:") and "Traceback" not in bad.stderr


def test_curves_of_a_sweep_average_the_same_seeds():
    """layers.png and inter.png: GRPO's 5 seeds are cut to the 3 a sweep has, so the curves are
    paired."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report
    configs = {"grpo": {k: f"g{k}" for k in range(5)}, "bupo-l8": {k: f"b{k}" for k in range(3)},
               "bupo-l15": {1: "c1", 2: "c2", 7: "c7"}}
    shown, note = report.on_shared_seeds(configs, ["grpo", "bupo-l8", "missing"])
    assert shown == {"grpo": {0: "g0", 1: "g1", 2: "g2"}, "bupo-l8": {0: "b0", 1: "b1", 2: "b2"}}
    assert note == "3 seeds (0-2)"
    shown, note = report.on_shared_seeds(configs, ["grpo", "bupo-l8", "bupo-l15"])
    assert ({c: list(r) for c, r in shown.items()}
            == {"grpo": [1, 2], "bupo-l8": [1, 2], "bupo-l15": [1, 2]})
    shown, note = report.on_shared_seeds({"a": {0: 1}, "b": {1: 2}}, ["a", "b"])
    assert shown == {"a": {0: 1}, "b": {1: 2}} and "unpaired" in note
    assert report.seed_ranges({0, 1, 2, 3, 5, 7, 8}) == "0-3, 5, 7-8"
    assert report.seed_ranges([4]) == "4" and report.seed_ranges([]) == ""


def test_report_from_its_own_copies(tmp_path):
    """The copies under OUT/runs carry no .done marker: a run whose last step is its --steps counts
    as finished, so `--runs OUT/runs --out OUT` rebuilds the same tables (and copies nothing onto
    itself)."""
    out = tmp_path / "results"
    for seed in (0, 1):
        fake_run(out / "runs" / f"grpo-s{seed}", "grpo", seed, [0.2, 0.5 + 0.1 * seed], steps=2,
                 marker=False)
    # stopped at step 2 of 5
    fake_run(out / "runs" / "grpo-s2", "grpo", 2, [0.2, 0.9], steps=5, marker=False)
    done = subprocess.run([sys.executable, "experiments/report.py", "--runs", str(out / "runs"),
                           "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (out / "results.md").read_text()
    assert "| grpo | GRPO | 2 |" in text and "Not finished, left out: grpo-s2" in text


def check_quickstart(run: Path):
    return subprocess.run([sys.executable, "experiments/check_quickstart.py", str(run)], cwd=ROOT,
                          capture_output=True, text=True)


def test_check_quickstart(tmp_path):
    """The quick-start check tells the reference's own numbers (identical), another CPU's rounding,
    a changed computation and a broken README range apart; a shorter run with other arguments is
    compared on the steps both have, with a note."""
    ref = ROOT / "experiments" / "results" / "quickstart"
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    args = json.loads((ref / "args.json").read_text())
    run = tmp_path / "run" / "bupo"
    run.mkdir(parents=True)

    def check(rows, **changed):
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (run / "args.json").write_text(json.dumps({**args, **changed, "out": "elsewhere"}))
        return check_quickstart(tmp_path / "run")

    def at(step, **changed):
        return [{**r, **changed} if r["step"] == step and "reward" in r else r for r in rows]

    # timings never count
    done = check([{**r, "step_time": 1.0} if "step_time" in r else r for r in rows])
    assert done.returncode == 0 and f"identical: all {len(rows)} steps" in done.stdout, done.stdout
    # another CPU: the step-1 entropy 1.6e-4 off, and the runs part ways later (a flipped token)
    step1 = rows[1]["entropy"] * (1 + 1.6e-4)
    drift = [{**r, "entropy": step1} if r["step"] == 1 else r for r in at(4, reward=0.96875)]
    done = check(drift)
    assert done.returncode == 0 and "verdict: rounding" in done.stdout, done.stdout
    assert "step 1, the first difference, is float rounding" in done.stdout, done.stdout
    # the same tokens, a loss 10% off: the computation changed
    done = check(at(1, loss=rows[1]["loss"] * 1.1))
    assert done.returncode == 1 and "moved by more than rounding" in done.stdout, done.stdout
    # a flipped token that leaves README's range
    done = check(at(2, reward=0.125))
    assert done.returncode == 1 and "train reward at step 2 is 0.125" in done.stdout, done.stdout
    # the untrained model's greedy answers samples nothing: a difference there is not rounding
    done = check([{**r, "eval/greedy_acc": 0.625} if r["step"] == 0 else r for r in rows])
    assert done.returncode == 1 and "step 0, the untrained model's" in done.stdout, done.stdout
    # --steps 2 --eval-every 0
    done = check([r for r in rows if 1 <= r["step"] <= 2], steps=2, eval_every=0)
    assert done.returncode == 0 and "--steps 2 (reference 6)" in done.stdout, done.stdout
    assert "identical: the 2 steps both have" in done.stdout, done.stdout
    (run / "metrics.jsonl").write_text('{"step": 1, "rew')
    done = check_quickstart(tmp_path / "run")
    assert (done.returncode == 1 and done.stderr.startswith("error: ")
            and "Traceback" not in done.stderr)


def test_check_quickstart_holds_the_analysis_to_the_same_rule(tmp_path):
    """entropy.json beside the run: identical, rounding-level (passes), or the same tokens with an
    entropy moved by more than rounding (fails)."""
    ref = ROOT / "experiments" / "results" / "quickstart"
    (tmp_path / "bupo").mkdir()
    (tmp_path / "analysis").mkdir()
    (tmp_path / "bupo" / "metrics.jsonl").write_text((ref / "metrics.jsonl").read_text())
    flow = json.loads((ref / "entropy.json").read_text())
    for factor, code, word in ((1.0, 0, "identical"), (1 + 1e-5, 0, "rounding"),
                               (1.05, 1, "regression")):
        flow["H_policy"] = json.loads((ref / "entropy.json").read_text())["H_policy"] * factor
        (tmp_path / "analysis" / "entropy.json").write_text(json.dumps(flow))
        done = check_quickstart(tmp_path)
        assert done.returncode == code and f"verdict: {word}" in done.stdout, done.stdout


def test_plan_verdict_follows_the_plan():
    """experiments/PLAN.md's verdicts, decided in advance: interim before 20 pairs; then a
    difference when the 95% interval excludes 0, equivalence when the 90% interval lies within
    +-0.05, else inconclusive."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def configs(diffs):
        run = lambda acc: {"rows": [{"step": 0, "eval/greedy_acc": 0.4},
                                    {"step": 40, "eval/greedy_acc": acc}]}  # noqa: E731
        return {"grpo": {s: run(0.5) for s in range(len(diffs))},
                "bupo": {s: run(0.5 + d) for s, d in enumerate(diffs)}}
    assert "Interim: no verdict" in report.plan_verdict(configs([0.01, -0.01, 0.02]))
    assert "3 of 20 pairs" in report.plan_verdict(configs([0.01, -0.01, 0.02]))
    # mean 0, SD 0.01: equivalent
    small = [0.01 * (-1) ** s for s in range(20)]
    verdict = report.plan_verdict(configs(small))
    assert "Verdict: BuPO and GRPO are equivalent within 5 points" in verdict
    better = [0.04 + 0.01 * (-1) ** s for s in range(20)]                  # 95% interval above 0
    assert "Verdict: BuPO is better than GRPO by +0.040" in report.plan_verdict(configs(better))
    wide = [0.2 * (-1) ** s for s in range(20)]                            # mean 0, SD 0.2: neither
    assert "Verdict: Inconclusive" in report.plan_verdict(configs(wide))


def test_plan_secondary_endpoints_are_paired_differences():
    """The plan's secondary endpoints: avg@2 at step 40, greedy at step 20, and the mean train
    reward over steps 5-40 (phase 1's steps 1-4 left out), each BuPO − GRPO paired by seed."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(shift):
        rows = [{"step": 0, "eval/greedy_acc": 0.4, "eval/avg@2": 0.2}]
        rows += [{"step": s, "reward": (0.9 if s <= 4 else 0.5) + shift} for s in range(1, 41)]
        rows[20].update({"eval/greedy_acc": 0.45 + shift, "eval/avg@2": 0.3})
        rows[40].update({"eval/greedy_acc": 0.5, "eval/avg@2": 0.4 + 2 * shift})
        return {"args": {"eval_samples": 2}, "rows": rows}
    shifts = {0: 0.01, 1: 0.03, 2: -0.01}
    configs = {"grpo": {s: run(0.0) for s in shifts},
               "bupo": {s: run(d) for s, d in shifts.items()}}
    text = report.plan_secondary(configs)
    want = report.paired([0.02, 0.06, -0.02])          # avg@2: twice the shift
    assert f"| held-out avg@2 at step 40 | 3 | {want} | 2 / 1 |" in text
    want = report.paired([0.01, 0.03, -0.01])
    assert f"| held-out greedy accuracy at step 20 | 3 | {want} | 2 / 1 |" in text
    assert f"| mean train reward, steps 5-40 | 3 | {want} | 2 / 1 |" in text


def test_plan_pairs_table_names_each_arms_code():
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(acc, code=None):
        return {"args": {"code": code} if code else {},
                "rows": [{"step": 0, "eval/greedy_acc": 0.4}, {"step": 40, "eval/greedy_acc": acc}]}
    clean = {"commit": "0123456789ab", "clean": True}
    dirty = {"commit": "fedcba987654", "clean": False}
    configs = {"grpo": {0: run(0.5), 5: run(0.5, clean), 7: run(0.5, clean)},
               "bupo": {0: run(0.25), 5: run(0.625, dirty), 6: run(0.5, clean)}}
    text = report.plan_pairs_table(configs)
    assert "| 0 | - | - | 0.500 | 0.250 | -0.250 |" in text
    assert "| 5 | 0123456 | fedcba9* | 0.500 | 0.625 | +0.125 |" in text
    assert "| 6 |" not in text and "| 7 |" not in text          # one arm only: not a pair


def test_dose_verdict_follows_the_dose_plan():
    """The dose plan (experiments/PLAN.md): dose10 − dose4 paired over seeds 20-25, interim before
    the 6th pair, then a difference only when its 95% interval excludes 0; runs that end below
    their own step-0 accuracy are counted per arm."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(acc, s):
        rows = [{"step": 0, "eval/greedy_acc": 0.5, "eval/avg@2": 0.3}]
        rows += [{"step": k, "reward": acc} for k in range(1, 41)]
        rows[40].update({"eval/greedy_acc": acc, "eval/avg@2": acc})
        return {"args": {"internal_steps": s, "eval_samples": 2}, "rows": rows}

    def configs(diffs):
        return {"bupo-dose4": {20 + k: run(0.6, 4) for k in range(len(diffs))},
                "bupo-dose10": {20 + k: run(0.6 + d, 10) for k, d in enumerate(diffs)}}
    text = report.dose_verdict(configs([-0.1, -0.2, -0.15]))
    assert "over seeds 20, 21, 22" in text and "Interim: no verdict" in text
    assert "dose4: 0 of 3, dose10: 2 of 3" in text                        # 0.45, 0.4 < 0.5
    assert "dose20 − dose4: no finished pair yet" in text
    lower = [-0.2 + 0.02 * (-1) ** k for k in range(6)]                   # far below, tight
    text = report.dose_verdict(configs(lower))
    assert f"Verdict: a phase 1 of 10 steps ends {statistics.mean(lower):+.3f}" in text
    assert "0 / 6 seeds better / worse" in text
    assert "dose4: 0 of 6, dose10: 6 of 6" in text                       # 0.4 < 0.5 at step 0
    wide = [0.3 * (-1) ** k for k in range(6)]
    assert "Verdict: could not tell at 6 seeds." in report.dose_verdict(configs(wide))


def test_mechanism_table_reads_the_delay_and_the_refinement():
    """Phase 1 as a pure delay reads 0 (BuPO's steps s+1..s+10 against GRPO's 1..10, paired);
    cos(h_l, h_L)'s change per step is taken over phase 1 and over as many steps after it."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(algo, seed, delay):
        rows = [{"step": 0, "eval/greedy_acc": 0.4}]
        for k in range(1, 41):
            t = k - delay                                 # the same curve, `delay` steps later
            rows.append({"step": k, "reward": 0.1 * max(t, 0) / 40 + 0.01 * seed,
                         "entropy": 0.5 + 0.1 * seed * min(k, 4),
                         "internal/cos_to_top": 0.6 + 0.001 * min(k, 4) + 0.003 * max(k - 4, 0)})
        rows[40]["eval/greedy_acc"] = 0.5 + 0.01 * seed
        args = {"algo": algo, "internal_steps": 4, "internal_layer": 29, "seed": seed}
        return {"args": args, "rows": rows}
    configs = {"grpo": {s: run("grpo", s, 0) for s in range(5)},
               "bupo": {s: run("bupo", s, 4) for s in range(5)}}
    row = next(line for line in report.mechanism_table(configs).splitlines()
               if line.startswith("| bupo |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[3] == report.paired([0.0] * 5)                 # a pure delay
    assert cells[4] == report.mean_se([0.001] * 5, "{:+.5f}")   # phase 1: 0.001 per step
    assert cells[5] == report.mean_se([0.003] * 5, "{:+.5f}")   # after: 0.003 per step
    assert cells[7] == "+1.00"         # each seed's entropy rise goes with its final accuracy


def test_changes_of_the_dose_runs(tmp_path):
    """analyze.py --against's changes.json of each dose run: grouped by configuration and
    checkpoint, averaged over seeds, nothing above l for a phase-1 checkpoint, and a figure."""
    runs, out = tmp_path / "runs", tmp_path / "out"

    def changes(name, seed, step, above):
        d = runs / f"changes-{name}-s{seed}-step{step}"
        d.mkdir(parents=True)
        layers = [{"layer": k, "kl": 0.1 * k * (k <= 2), "dH": 0.0, "dKL_policy": 0.0,
                   "dcos": 0.01 * seed * k, "attn": 0.002 if k <= 2 else above,
                   "mlp": 0.004 if k <= 2 else above} for k in (1, 2, 3)]
        (d / "changes.json").write_text(json.dumps({
            "base": "m", "trained": f"runs/exp/{name}-s{seed}/checkpoints/step_{step:06d}",
            "num_layers": 3, "num_responses": 4, "num_tokens": 40, "layers": layers,
            "run": {"step": step, "algo": "bupo", "internal_layer": 2, "internal_steps": 4},
            "unembedding": 0.0 if step == 4 else 0.001, "final_norm": 0.0}))
        (d / "entropy.json").write_text("{}")    # analyze.py writes both; not a flow
    for seed in (20, 21):
        changes("bupo-dose4", seed, 4, 0.0)
        changes("bupo-dose4", seed, 40, 0.003)
    done = subprocess.run([sys.executable, "experiments/report.py", "--runs", str(runs), "--out",
                           str(out)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = (out / "results.md").read_text()
    assert "### Entropy flow" not in text
    z = "0.00e+00 ± 0.00e+00"
    # Δcos at l = 2, then its mean over the layers below l (layer 1 here)
    assert (f"| bupo-dose4 | 4 | 2 | 2 | 0.2 ± 0 | 0 ± 0 | 0.41 ± 0.01 | 0.205 ± 0.005 | 0 ± 0 | "
            f"3.00e-03 ± 0.00e+00 | {z} | {z} |") in text                # nothing above l = 2
    assert ("| bupo-dose4 | 40 | 2 | 2 | 0.2 ± 0 | 0 ± 0 | 0.41 ± 0.01 | 0.205 ± 0.005 | 0 ± 0 | "
            "3.00e-03 ± 0.00e+00 | 3.00e-03 ± 0.00e+00 | 1.00e-03 ± 0.00e+00 |") in text
    assert (out / "changes-dose.png").stat().st_size > 0
    assert (out / "runs" / "changes-bupo-dose4-s20-step4" / "changes.json").exists()


def test_qwen_verdicts_follow_the_plan():
    """experiments/PLAN.md (a): the clip bounds pi^l's change when the BuPO arm's median ppo-kl
    and pre-clip grad norm over steps 2-8 are within 3x and 10x of GRPO's; phase 1 refines the
    features at l when Δcos at l beats GRPO's on every seed; a changed block above l is named."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(kl, gn):
        rows = [{"step": 0, "eval/greedy_acc": 0.7}]
        rows += [{"step": k, "kl": kl, "grad_norm": gn, "reward": 0.5} for k in range(1, 9)]
        rows[8]["eval/greedy_acc"] = 0.75
        return {"args": {}, "rows": rows}

    def changed(arm, seed, l, dcos, above=0.0):
        layers = [{"layer": k, "dcos": dcos if k == l else 0.0, "attn": 0.1 if k <= l else above,
                   "mlp": 0.0} for k in range(1, 25)]
        return {"trained": f"runs/exp/{arm}-s{seed}/checkpoints/step_000008",
                "run": {"internal_layer": l}, "layers": layers}
    configs = {"qwen-grpo": {30: run(0.01, 1.0), 31: run(0.01, 1.0)},
               "qwen-auto": {30: run(0.02, 5.0), 31: run(0.02, 5.0)},
               "qwen-l12": {30: run(0.5, 50.0), 31: run(0.5, 50.0)}}
    changes = {f"c{k}": c for k, c in enumerate([
        changed("qwen-grpo", 30, 24, 0.0), changed("qwen-grpo", 31, 24, 0.0),
        changed("qwen-auto", 30, 23, 0.01), changed("qwen-auto", 31, 23, 0.02),
        changed("qwen-l12", 30, 12, 0.01), changed("qwen-l12", 31, 12, -0.01, above=1e-3)])}
    text = report.qwen_verdicts(configs, changes)
    assert "qwen-auto: median ppo-kl over steps 2-8 0.02 (2x GRPO's 0.01)" in text
    assert "(5x GRPO's 1): within the plan's bounds" in text
    assert "qwen-l12: median ppo-kl over steps 2-8 0.5 (50x" in text and "outside" in text
    assert "seed 30 (l = 23) +0.0100 against +0.0000" in text
    assert "Phase 1 refines the features at l: larger on every seed." in text
    assert "qwen-l12: Δcos" in text and "Not seen at these seeds." in text
    assert "qwen-auto: blocks above l that changed: none" in text
    assert "qwen-l12: blocks above l that changed: 13, 14" in text and "(a bug)" in text
    assert "seed 30: 0.700 -> 0.750" in text
    assert "Not all three arms" in report.qwen_verdicts({"qwen-grpo": configs["qwen-grpo"]}, {})
    # one seed of each arm, or a seed without its per-layer report: numbers, no verdict
    one = {arm: {30: runs[30]} for arm, runs in configs.items()}
    text = report.qwen_verdicts(one, changes)
    assert "median pre-clip grad norm 5 (5x GRPO's 1): interim, no verdict" in text
    assert "within" not in text and "refines" not in text and "Not seen" not in text
    text = report.qwen_verdicts(configs, {k: c for k, c in changes.items() if k != "c3"})
    assert "(5x GRPO's 1): within the plan's bounds" in text                # both seeds ran
    assert "qwen-auto: Δcos(h_l, h_L) at l, BuPO against GRPO: seed 30 (l = 23) +0.0100 against " \
           "+0.0000. interim, no verdict" in text                 # seed 31's report is missing
    # ppo-kl is an estimate: GRPO's median can be negative; 3x of it is then below any positive
    # median, which is outside (a ratio would have flipped the sign and said within)
    configs["qwen-grpo"] = {30: run(-0.001, 1.0), 31: run(-0.001, 1.0)}
    text = report.qwen_verdicts(configs, changes)
    assert ("qwen-auto: median ppo-kl over steps 2-8 0.02 (no ratio to GRPO's -0.001), median "
            "pre-clip grad norm 5 (5x GRPO's 1): outside the plan's bounds") in text


def test_closest_layer_rule():
    """The project's closest-layer rule (experiments/layer_rule.py), tested and not used by
    --internal-layer auto (docs/method.md 5)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from layer_rule import closest_layer
    # ties: the lower layer
    assert closest_layer([4.0, 1.0, 1.0, 0.0]) == 2
    # within 10% of the least: the lowest such
    assert closest_layer([29.0, 17.46, 18.0, 17.44, 0.0]) == 2
    assert closest_layer([29.0, 17.46, 18.0, 17.44, 0.0], tolerance=0) == 4
    # a falling KL: L - 1
    assert closest_layer([5.0, 2.0, 1.0, 0.0]) == 3
    # one layer: nothing below
    assert closest_layer([0.0]) == 1
    # NaN / inf never closest
    assert closest_layer([math.nan, 2.0, math.inf, 0.0]) == 2
    # none measurable: L - 1
    assert closest_layer([math.nan, math.nan, 0.0]) == 2


def test_a_run_that_is_all_phase_1_has_no_steps_after_the_switch():
    """experiments/PLAN.md (a)'s BuPO arms are phase 1 for all 8 steps: the phase-1 table says "-"
    for the steps after the switch (it raised StatisticsError on an empty window)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import report

    def run(algo):
        rows = [{"step": k, "reward": 0.5, "entropy": 0.3, "phase": "internal" if algo == "bupo"
                 else "full", "internal/entropy": 4.0, "internal/kl_to_policy": 3.8,
                 "policy_layer": 23} for k in range(1, 9)]
        return {"args": {"algo": algo, "internal_steps": 8, "internal_layer": 23}, "rows": rows}
    text = report.internal_table({"grpo": {30: run("grpo")}, "qwen-auto": {30: run("bupo")}})
    row = next(line for line in text.splitlines() if line.startswith("| qwen-auto"))
    assert row.endswith("| 0.50 (GRPO 0.50) | - |"), row

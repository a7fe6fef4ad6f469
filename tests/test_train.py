"""GRPO/BuPO objective against hand-computed numbers; phase-1 gradients; train.py end to end and
resume."""
import json
import math

import pytest
import torch

import bupo
import reference
import tasks
import train
import analyze as evaluation
from infra import cli
from model import Transformer


# -----------------------------------------------------------------------------
# the objective, by hand (docs/method.md, "What the tests pin down")

def test_grpo_advantages_by_hand():
    a = bupo.group_advantages(torch.tensor([1.0, 0, 0, 0, 0, 0, 0, 0]), 8)
    # mean 0.125, unbiased std 0.3536: (1 - 0.125) / 0.3536 = 2.475, (0 - 0.125) / 0.3536 = -0.354
    assert (a[0].item() == pytest.approx(2.4749, abs=1e-3)
            and a[1:].tolist() == pytest.approx([-0.35355] * 7, abs=1e-4))
    # all-equal groups: 0
    assert bupo.group_advantages(torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]), 4).abs().max() == 0
    assert (bupo.group_advantages(torch.tensor([1.0, 0.0]), 1).tolist()
            == pytest.approx([1 / (1 + 1e-6), 0.0]))
    assert (bupo.group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, "drgrpo").tolist()
            == [0.5, -0.5, -0.5, 0.5])
    # leave-one-out: 1 - (0 + 0 + 1) / 3 = 2/3, 0 - (1 + 0 + 1) / 3 = -2/3
    assert (bupo.group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, "rloo").tolist()
            == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="unknown advantage"):
        bupo.group_advantages(torch.ones(2), 2, "ppo")


def test_policy_loss_by_hand():
    ratio = torch.tensor([[1.0, 1.5, 0.5, 20.0, 0.5]])
    A = torch.tensor([1.0])
    old = torch.zeros(1, 5)
    loss, s = bupo.policy_loss(ratio.log(), old, A, torch.ones(1, 5))
    # A > 0: max(-r, -clip(r, 0.8, 1.2)) = -1, -1.2 (clipped high), -0.5, -1.2, -0.5
    assert loss[0].tolist() == pytest.approx([-1.0, -1.2, -0.5, -1.2, -0.5])
    assert s["clip_ratio/high"] == 2 and s["clip_ratio/low"] == 0
    loss, s = bupo.policy_loss(ratio.log(), old, -A, torch.ones(1, 5))
    # A < 0: max(r, clip(r)) = 1, 1.5, 0.8 (clipped low), 20 -> dual clip min(20, 10) = 10, 0.8
    assert loss[0].tolist() == pytest.approx([1.0, 1.5, 0.8, 10.0, 0.8])
    assert s["clip_ratio/low"] == 2 and s["clip_ratio/dual"] == 1
    loss, _ = bupo.policy_loss(ratio.log(), old, -A, torch.ones(1, 5), dual_clip=0)
    assert loss[0, 3].item() == pytest.approx(20.0)
    # clip-higher
    loss, _ = bupo.policy_loss(ratio.log(), old, A, torch.ones(1, 5), clip_low=0.2, clip_high=0.28)
    assert loss[0, 1].item() == pytest.approx(-1.28)
    # ppo_kl is the masked sum of -log ratio; a masked token counts nothing
    _, s = bupo.policy_loss(ratio.log(), old, A, torch.tensor([[1, 1, 0, 0, 0]]))
    assert s["ppo_kl"].item() == pytest.approx(-math.log(1.5))


def test_aggregations_by_hand():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # token-mean over the 4 tokens of the mini-batch; here the micro-batch is the whole mini-batch
    assert bupo.aggregate(loss, mask, "token-mean", 2, 4, 3).item() == pytest.approx(10 / 4)
    assert (bupo.aggregate(loss, mask, "seq-mean-token-mean", 2, 4, 3).item()
            == pytest.approx((2 + 4) / 2))
    assert (bupo.aggregate(loss, mask, "seq-mean-token-sum-norm", 2, 4, 3).item()
            == pytest.approx(10 / (2 * 3)))
    # split in two micro-batches, the shares add up to the mini-batch loss exactly
    for mode in bupo.AGGREGATIONS:
        parts = sum(bupo.aggregate(loss[i:i + 1], mask[i:i + 1], mode, 2, 4, 3) for i in range(2))
        assert parts.item() == pytest.approx(bupo.aggregate(loss, mask, mode, 2, 4, 3).item())


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    assert bupo.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    d = ref - logp
    assert bupo.kl_penalty(logp, ref, "k3").tolist() == pytest.approx((d.exp() - d - 1).tolist())
    assert ((bupo.kl_penalty(logp, ref, "k3") >= 0).all()
            and bupo.kl_penalty(ref, ref).abs().max() == 0)


def test_phase_switch():
    # BuPO optimises pi^l (here l = 5 of L = 30) for steps 1..s_inter, then the model's policy; GRPO
    # never pi^l
    assert [bupo.phase_layer("bupo", s, 2, 5, 30) for s in (1, 2, 3, 4)] == [5, 5, 30, 30]
    assert [bupo.phase_layer("grpo", s, 2, 5, 30) for s in (1, 2, 3)] == [30, 30, 30]
    assert bupo.phase_layer("bupo", 1, 0, 5, 30) == 30          # s_inter = 0 is GRPO


def test_pass_at_k():
    assert evaluation.pass_at_k(4, 0, 1) == 0 and evaluation.pass_at_k(4, 4, 2) == 1
    assert evaluation.pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert evaluation.pass_at_k(4, 1, 4) == 1.0
    assert evaluation.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))


# -----------------------------------------------------------------------------
# gradients of phase 1

@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen3", False)])
def test_phase1_gradients_stop_at_layer_k(tiny_dirs, arch, tied):
    model = Transformer.from_pretrained(tiny_dirs[arch, tied])
    ids = torch.randint(0, 128, (2, 10))
    mask = torch.ones_like(ids)
    # pi^1: block 1 and W_U (and E) learn; blocks 2..3 and the final norm get no gradient at all
    k = 1
    logp, _ = bupo.policy_logprobs(model, bupo.Batch(ids, mask, 4), k, 1.0)
    loss, _ = bupo.policy_loss(logp, logp.detach(), torch.tensor([1.0, -0.5]), mask[:, 4:])
    bupo.aggregate(loss, mask[:, 4:], "token-mean", 2, 12, 6).backward()
    for name, p in model.named_parameters():
        above = name.startswith(("layers.1.", "layers.2.", "norm."))
        assert (p.grad is None) == above, name
    assert (model.lm_head.weight.grad.abs().sum() > 0
            and model.embed_tokens.weight.grad.abs().sum() > 0)
    # AdamW with set_to_none leaves the upper blocks exactly as they were, weight decay included
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    opt.step()
    opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        above = name.startswith(("layers.1.", "layers.2.", "norm."))
        assert torch.equal(p, before[name]) == above, name


def test_internal_logprobs_at_L_are_the_policy(tiny_dirs):
    model = Transformer.from_pretrained(tiny_dirs["qwen2", False])
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones_like(ids)
    got, _ = bupo.policy_logprobs(model, bupo.Batch(ids, mask, 3), model.config.num_layers, 1.0)
    want = model(ids).log_softmax(-1)[:, 2:-1].gather(-1, ids[:, 3:, None])[..., 0]
    torch.testing.assert_close(got, want)


# -----------------------------------------------------------------------------
# train.py end to end on a tiny random model that speaks the default model's tokenizer

@pytest.fixture
def length_reward(monkeypatch):
    """A random model never boxes the answer; reward parity of the length instead, so advantages are
    not 0."""
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))


def test_evaluate_in_chunks_gives_the_same_numbers(tiny_chat_model, length_reward, monkeypatch):
    """--eval-batch bounds how many problems are sampled together (memory only): same seeds per
    problem, same metrics as all at once."""
    import argparse
    model, tok = evaluation.load(str(tiny_chat_model))
    sizes = []
    real = evaluation.generate
    monkeypatch.setattr(evaluation, "generate", lambda m, prompts, *a,
                        **k: sizes.append(len(prompts)) or real(m, prompts, *a, **k))
    ns = dict(task="add", eval_problems=7, eval_samples=3, seed=0, shots=1, max_new_tokens=5,
              temperature=1.0, compile=False, eval_greedy=False)
    src = tasks.Source("add", 1)
    whole = train.evaluate(model, tok, src, argparse.Namespace(**ns, eval_batch=0))
    assert sizes == [7, 7]
    sizes.clear()
    chunked = train.evaluate(model, tok, src, argparse.Namespace(**ns, eval_batch=3))
    # greedy and sampled, per chunk of 3, 3 and 1 problems
    assert sizes == [3, 3, 3, 3, 1, 1]
    whole.pop("eval_time"), chunked.pop("eval_time")
    assert chunked == pytest.approx(whole) and 0 < whole["eval/avg@3"] < 1 and set(whole) == {
        "eval/greedy_acc", "eval/avg@3", "eval/pass@1", "eval/pass@2", "eval/pass@3"}


def run(model_dir, out, *extra):
    train.main(["--model", str(model_dir), "--out", str(out), "--prompts-per-step", "2",
                "--group-size", "4", "--mini-batches", "2", "--micro-batch-size", "2",
                "--max-new-tokens", "6", "--eval-problems", "2", "--eval-samples", "2",
                "--lr", "1e-3", "--internal-layer", "2", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def strip_timing(rows):
    timings = ("step_time", "tokens_per_s", "peak_memory_mb", "eval_time")
    return [{k: v for k, v in r.items() if k not in timings} for r in rows]


def test_three_steps_end_to_end(tiny_chat_model, tmp_path, length_reward):
    from transformers import AutoModelForCausalLM
    rows = run(tiny_chat_model, tmp_path / "r", "--steps", "3", "--internal-steps", "2",
               "--eval-every", "3")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["phase"] for r in rows[1:]] == ["internal", "internal", "full"]
    assert [r["policy_layer"] for r in rows[1:]] == [2, 2, 3]
    for r in rows[1:]:
        assert (0 <= r["reward"] <= 1 and r["grad_norm"] > 0 and "internal/kl_to_policy" in r
                and "entropy" in r)
    assert "eval/greedy_acc" in rows[0] and "eval/pass@2" in rows[3]
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000
    import subprocess
    # which code made the run
    code = json.loads((tmp_path / "r" / "args.json").read_text())["code"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:    # a git checkout (CI's fresh clone is one)
        assert code["commit"] == head.stdout.strip() and isinstance(code["clean"], bool)
    ckpt = tmp_path / "r" / "checkpoints" / "step_000003"
    ours = Transformer.from_pretrained(ckpt)
    hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    x = torch.randint(0, 49152, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-4, rtol=0)


def test_first_minibatch_ratio_is_one(tiny_chat_model, tmp_path, length_reward):
    for algo in ("bupo", "grpo"):
        rows = run(tiny_chat_model, tmp_path / algo, "--algo", algo, "--steps", "1",
                   "--mini-batches", "1",
                   "--eval-every", "0")
        # one mini-batch: evaluated with the weights of the old log-probs (BuPO's phase 1: the old
        # pass; GRPO: the sampler's, --old-logprobs auto), so log ratio 0 up to float noise
        assert (abs(rows[0]["kl"]) < 1e-6
                and rows[0]["clip_ratio/low"] == rows[0]["clip_ratio/high"] == 0)


def test_bupo_at_layer_L_is_grpo(tiny_chat_model, tmp_path, length_reward):
    a = run(tiny_chat_model, tmp_path / "a", "--algo", "grpo", "--steps", "2", "--eval-every", "0")
    b = run(tiny_chat_model, tmp_path / "b", "--algo", "bupo", "--internal-layer", "3", "--steps",
            "2",
            "--eval-every", "0")
    keys = ("reward", "loss", "kl", "grad_norm", "entropy", "policy_layer", "clip_ratio/low",
            "clip_ratio/high")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]


def test_resume_is_exact(tiny_chat_model, tmp_path, length_reward):
    straight = run(tiny_chat_model, tmp_path / "s", "--steps", "4", "--internal-steps", "2",
                   "--save-every", "2",
                   "--eval-every", "2")
    run(tiny_chat_model, tmp_path / "r", "--steps", "2", "--internal-steps", "2", "--save-every",
        "2",
        "--eval-every", "2")
    train.main(["--resume", str(tmp_path / "r"), "--steps", "4"])
    resumed = [json.loads(line)
               for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert strip_timing(resumed) == strip_timing(straight)
    a = Transformer.from_pretrained(tmp_path / "s" / "checkpoints" / "step_000004").state_dict()
    b = Transformer.from_pretrained(tmp_path / "r" / "checkpoints" / "step_000004").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_forwards_see_every_update(tiny_chat_model, tmp_path, length_reward, monkeypatch):
    """Mixed precision on a CPU, as on a GPU (infra/precision.py): every matmul that runs under
    autocast (the rollout, the old pass, each micro-batch's forward, the evaluation) must use the
    bf16 cast of the weights as they are *now*. Autocast keeps its casts of fp32 weights until the
    outermost region exits and opt.step() does not invalidate them, so one region around the run
    trains every Linear against its step-0 weights."""
    import torch.nn.functional as F
    real_linear, real_step = F.linear, torch.optim.AdamW.step
    seen = {"updates": 0, "checked": [], "stale": []}

    def linear(x, w, b=None):
        out = real_linear(x, w, b)
        if torch.is_autocast_enabled("cpu"):
            # the same product, from a fresh cast of the current weights
            with torch.autocast("cpu", enabled=False):
                bf = torch.bfloat16
                fresh = real_linear(x.to(bf), w.to(bf), None if b is None else b.to(bf))
            seen["checked"].append(seen["updates"])
            if out.dtype != bf or not torch.equal(out, fresh):
                seen["stale"].append(seen["updates"])
        return out

    def step(self, *a, **k):
        assert not torch.is_autocast_enabled("cpu"), "opt.step() ran inside an autocast region"
        seen["updates"] += 1
        return real_step(self, *a, **k)
    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    rows = run(tiny_chat_model, tmp_path / "bf16", "--dtype", "bfloat16", "--steps", "3",
               "--internal-steps", "1",
               "--eval-every", "3")
    assert seen["updates"] == 6                                   # 3 steps x 2 mini-batches
    # a forward after each update (6: the eval)
    assert set(range(7)) <= set(seen["checked"])
    stale = sorted(set(seen["stale"]))
    assert stale == [], f"forwards after updates {stale} used stale bf16 weights"
    for r in rows[1:]:
        # the later mini-batch of each step sees the first one's update: the ratio moved
        assert math.isfinite(r["loss"]) and r["kl"] != 0 and r["grad_norm"] > 0
    # fp32 master weights in the checkpoint
    from safetensors.torch import load_file
    saved = load_file(tmp_path / "bf16" / "checkpoints" / "step_000003" / "model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    fp32 = run(tiny_chat_model, tmp_path / "fp32", "--dtype", "float32", "--steps", "1",
               "--eval-every", "0")
    # --dtype changes the arithmetic, not only a label
    assert fp32[0]["kl"] != rows[1]["kl"]


def test_resume_loads_the_model_after_the_rank_device_is_chosen(tiny_chat_model, tmp_path,
                                                                length_reward, monkeypatch):
    """Under torchrun the rank's device is chosen in dp.setup; a model loaded onto a device before
    that lands on the default GPU on every rank. Resume checks its checkpoint on the meta device and
    loads after setup."""
    run(tiny_chat_model, tmp_path / "r", "--steps", "1", "--eval-every", "0", "--save-every", "1")
    events, real_setup, real_load = [], train.dp.setup, Transformer.from_pretrained.__func__
    monkeypatch.setattr(train.dp, "setup",
                        lambda *a, **k: events.append("setup") or real_setup(*a, **k))

    def load(cls, path, **k):
        events.append(f"load:{k.get('device', 'cpu')}")
        return real_load(cls, path, **k)
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(load))
    train.main(["--resume", str(tmp_path / "r"), "--steps", "2"])
    assert "setup" in events
    before = events[:events.index("setup")]
    # nothing real is loaded before setup
    assert all(e == "load:meta" for e in before), events
    assert [e for e in events[events.index("setup"):] if e.startswith("load")] == ["load:cpu"]


def test_kl_penalty_in_both_phases(tiny_chat_model, tmp_path, length_reward):
    rows = run(tiny_chat_model, tmp_path / "kl", "--steps", "2", "--internal-steps", "1",
               "--kl-coef", "0.1",
               "--eval-every", "0", "--shots", "1")
    assert [r["phase"] for r in rows] == ["internal", "full"]
    assert all(math.isfinite(r["kl_ref"]) and r["kl_ref"] >= 0 for r in rows)  # k3 is non-negative


def test_bad_arguments(tiny_chat_model, tmp_path):
    from infra.errors import UserError
    with pytest.raises(UserError, match="--internal-layer 7: this model has layers 1..3"):
        run(tiny_chat_model, tmp_path / "x", "--internal-layer", "7")
    # refused before the run folder was claimed
    assert not (tmp_path / "x" / "args.json").exists()
    with pytest.raises(UserError, match="no complete checkpoint"):
        train.main(["--resume", str(tmp_path)])


@pytest.mark.parametrize("layer", [1, 3])
def test_shared_prompt_pass_is_the_per_row_pass(tiny_dirs, layer):
    """bupo.response_states runs each distinct prompt once for all the rows that answer it: its
    log-probs and their gradients must be those of one plain pass over [prompt; response] per row
    (prompts of different lengths, left-padded; groups out of order; a response that is all padding
    after its first token)."""
    model = Transformer.from_pretrained(tiny_dirs["qwen2", False])
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 128, (n,), generator=g) for n in (5, 3)]
    Tp, R, rows = 5, 4, [0, 1, 0, 1, 1]                        # row i answers prompt rows[i]
    ids = torch.zeros(len(rows), Tp + R, dtype=torch.long)
    mask = torch.zeros(len(rows), Tp + R, dtype=torch.long)
    for i, p in enumerate(rows):
        ids[i, Tp - len(prompts[p]):Tp], mask[i, Tp - len(prompts[p]):Tp] = prompts[p], 1
        n = 1 if i == 3 else R
        ids[i, Tp:Tp + n], mask[i, Tp:Tp + n] = torch.randint(1, 128, (n,), generator=g), 1
    batch = bupo.Batch(ids, mask, Tp)
    got, _ = bupo.policy_logprobs(model, batch, layer)
    got.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    want = torch.zeros_like(got)
    for i in range(len(rows)):
        # one row at a time, no sharing, no padding on the right
        n = int(mask[i, Tp:].sum())
        row_ids, row_mask = ids[i:i + 1, :Tp + n], mask[i:i + 1, :Tp + n]
        h = model(row_ids, attention_mask=row_mask, upto_layer=layer)[0, Tp - 1:-1]
        want[i, :n] = reference.token_logprobs(model, h, row_ids[0, Tp:], layer)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got[3, 1:].eq(0).all()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in grads), name
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("argv,warned",
                         [(["--algo", "bupo", "--steps", "4", "--internal-steps", "4"], True),
                          (["--algo", "bupo", "--steps", "5", "--internal-steps", "4"], False),
                          (["--algo", "grpo", "--steps", "4", "--internal-steps", "4"], False)])
def test_a_run_that_is_all_phase_1_is_warned_about(argv, warned, capsys):
    cli.check_train(train.build_parser().parse_args(argv))
    assert ("every step is phase 1" in capsys.readouterr().err) == warned


def test_sampler_logprobs_are_the_old_pass(default_model_dir):
    """--old-logprobs sampler: the rollout's log-probs of its own tokens (KV-cache decode) against
    the old pass's (one pass per micro-batch), on the real model in fp32: equal up to rounding."""
    model, tok = evaluation.load(str(default_model_dir))
    src = tasks.Source("sum2", 1)
    prompts = [src.encode(tok, p) for p in tasks.problems("sum2", 2, seed=3)]
    ro = train.generate(model, prompts, 4, 24, 1.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                        seed=5)
    batch = bupo.Batch.of(ro)
    L = model.config.num_layers
    with torch.no_grad():
        old, _ = bupo.policy_logprobs(model, batch, L, stats_layer=L)
    keep = batch.response_mask.bool()
    assert keep.sum() > 40 and (ro.logprobs[~keep] == 0).all()
    assert (ro.logprobs - old).abs().max() < 2e-4     # measured: ~1e-5 on logs-probs down to -20


def test_old_logprobs_from_the_sampler(tiny_chat_model, tmp_path, length_reward):
    """A run on the sampler's old log-probs is the recomputing run up to rounding: same rewards
    and lengths, the loss, ratio and diagnostics within float noise, BuPO's internal diagnostics in
    phase 2 too (from the updates' forwards); the old pass is skipped only where the step optimises
    pi_theta."""
    calls = []
    real = train.old_pass
    train.old_pass = lambda *a, **k: calls.append(a[4]) or real(*a, **k)
    try:
        rows = {how: run(tiny_chat_model, tmp_path / how, "--steps", "3", "--internal-steps", "1",
                         "--eval-every", "0", "--old-logprobs", how)
                for how in ("recompute", "sampler")}
    finally:
        train.old_pass = real
    # recompute: every step; sampler: phase 1 (pi^2) only
    assert calls == [2, 3, 3, 2]
    a, b = rows["recompute"], rows["sampler"]
    for r, s in zip(a, b):
        for k in ("reward", "completions/mean_length", "phase", "policy_layer"):
            assert r[k] == s[k]
        for k in ("loss", "kl", "grad_norm"):
            assert s[k] == pytest.approx(r[k], rel=1e-3, abs=1e-5), k
        # the diagnostics of mini-batch 2 are taken after one update (lr 1e-3 here): close, not
        # equal
        for k in ("entropy", "internal/entropy", "internal/kl_to_policy", "internal/cos_to_top"):
            assert s[k] == pytest.approx(r[k], rel=0.05), k
    # auto is the sampler in fp32 without --kl-coef
    auto = run(tiny_chat_model, tmp_path / "auto", "--steps", "3", "--internal-steps", "1",
               "--eval-every", "0")
    assert strip_timing(auto) == strip_timing(b)


def test_old_logprobs_flag(tmp_path):
    from infra.errors import UserError
    p = train.build_parser()
    args = p.parse_args(["--kl-coef", "0.1", "--old-logprobs", "sampler", "--out", "x"])
    with pytest.raises(UserError, match="--old-logprobs sampler with --kl-coef 0.1"):
        cli.check_train(args)
    bf16 = torch.bfloat16
    for how, dtype, ref, want in [("auto", torch.float32, None, "sampler"),
                                  ("auto", bf16, None, "recompute"),
                                  ("auto", torch.float32, object(), "recompute"),
                                  ("sampler", bf16, None, "sampler"),
                                  ("recompute", torch.float32, None, "recompute")]:
        args = p.parse_args(["--old-logprobs", how])
        assert train.old_logprobs_source(args, dtype, ref) == want


def test_a_run_saved_before_the_flag_resumes_as_it_ran(tiny_chat_model, tmp_path, length_reward):
    """A run folder from before --old-logprobs existed recomputed its old log-probs: its resume
    keeps doing so (the default would change the run mid-way)."""
    straight = run(tiny_chat_model, tmp_path / "s", "--steps", "3", "--save-every", "2",
                   "--eval-every", "0", "--old-logprobs", "recompute")
    run(tiny_chat_model, tmp_path / "r", "--steps", "2", "--save-every", "2", "--eval-every", "0",
        "--old-logprobs", "recompute")
    # as such a run's folder holds it: no old_logprobs in args.json or in the checkpoint's state
    for f in [tmp_path / "r" / "args.json"]:
        saved = json.loads(f.read_text())
        saved.pop("old_logprobs")
        f.write_text(json.dumps(saved))
    ckpt = tmp_path / "r" / "checkpoints" / "step_000002"
    state_file = next(ckpt.glob("trainer_state*"))
    state = torch.load(state_file, weights_only=True)
    state["args"].pop("old_logprobs")
    torch.save(state, state_file)
    train.main(["--resume", str(tmp_path / "r"), "--steps", "3"])
    resumed = [json.loads(line)
               for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert strip_timing(resumed) == strip_timing(straight)

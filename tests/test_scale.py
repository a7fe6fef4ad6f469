"""The memory-saving paths compute what the plain ones do: chunked rollouts, checkpointed
gradients, the lean no-grad pass; and the memory plan refuses what cannot fit."""
import pytest
import torch

import bupo
import reference
import model as model_module
from model import Transformer
from rollout import generate


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return Transformer.from_pretrained(tiny_dirs["qwen3", False])


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 12, (n,), generator=g)]


def batch_of(model, n_prompts=3, G=4, seed=0):
    ro = generate(model, prompts(n_prompts, seed), G, 10, temperature=1.0, stop_ids={5},
                  seed=seed)
    return bupo.Batch.of(ro)


@pytest.mark.parametrize("max_rows", [4, 8, 12])
def test_rollouts_in_chunks_are_the_rollouts_of_one_call(tiny, max_rows):
    """--rollout-batch: 5 prompts x G = 4 sampled 1, 2 or 3 prompts at a time give the same rows
    (tokens, log-probs, groups, finish reasons) as one call: every row is seeded by its prompt."""
    ps = prompts(5, seed=3)
    one = generate(tiny, ps, 4, 12, temperature=1.0, stop_ids={5, 9}, seed=11)
    chunked = generate(tiny, ps, 4, 12, temperature=1.0, stop_ids={5, 9}, seed=11,
                       max_rows=max_rows)
    a, b = one.records(), chunked.records()
    assert len(a) == len(b) == 20
    for x, y in zip(a, b):
        assert x["response_ids"] == y["response_ids"] and x["group"] == y["group"]
        assert x["prompt_ids"] == y["prompt_ids"] and x["finish_reason"] == y["finish_reason"]
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-6)


def grads(model, batch, layer):
    model.zero_grad(set_to_none=True)
    logp, _ = bupo.policy_logprobs(model, batch, layer)
    (logp * batch.response_mask).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("layer", [2, 3])
def test_checkpointed_blocks_give_the_same_gradients(tiny_dirs, layer, monkeypatch):
    """--grad-checkpoint recomputes each block of the prompts' pass and of the responses' pass in
    the backward pass; the log-probs and every gradient are those of the plain pass, in phase 1
    (l = 2) and 2 (L = 3)."""
    model = Transformer.from_pretrained(tiny_dirs["llama", True])
    batch = batch_of(model)
    calls, real = [], model_module.Block.forward

    def counted(block, *a, **k):
        calls.extend([1] if block.layer == 0 else [])
        return real(block, *a, **k)
    monkeypatch.setattr(model_module.Block, "forward", counted)
    plain_logp, plain = grads(model, batch, layer)
    assert len(calls) == 2            # the prompts' pass and the responses'
    model.grad_checkpoint = True
    ckpt_logp, ckpt = grads(model, batch, layer)
    assert len(calls) == 2 + 4        # and both passes' first block again, in the backward pass
    assert torch.equal(plain_logp, ckpt_logp)
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=0, atol=1e-6, msg=n)


def test_the_lean_pass_is_the_two_passes_it_replaces(tiny):
    """The old log-probs and the diagnostics from one forward that keeps only h_l and h_L equal
    the log-probs alone and the diagnostics of a plain pass per row (tests/reference.py)."""
    batch = batch_of(tiny, seed=1)
    for layer, stats_layer in ((2, 2), (3, 2), (3, 3)):
        with torch.no_grad():
            want_logp, none = bupo.policy_logprobs(tiny, batch, layer)
            logp, stats = bupo.policy_logprobs(tiny, batch, layer, stats_layer=stats_layer)
        want = reference.policy_stats(tiny, batch, stats_layer)
        assert torch.equal(logp, want_logp) and none == {}
        assert stats.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(stats[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_the_lean_pass_unembeds_each_position_once_less(tiny, monkeypatch):
    """The diagnostics read the policy's own logits: one unembedding per chunk of positions for
    GRPO (pi_theta's logits serve the log-probs and H(pi_theta)), two for BuPO (pi^l's and
    pi_theta's), where computing them apart takes one more."""
    batch, L = batch_of(tiny, seed=1), tiny.config.num_layers
    calls = []
    real = bupo.layer_logits
    monkeypatch.setattr(bupo, "layer_logits", lambda *a, **kw: calls.append(a[2]) or real(*a, **kw))
    for layer, stats_layer, want in ((L, L, [L]), (L, 2, [L, 2]), (2, 2, [2, L])):
        calls.clear()
        bupo.policy_logprobs(tiny, batch, layer, stats_layer=stats_layer)
        assert calls == want, (layer, stats_layer, calls)


def test_linear_layers_skip_the_padding(tiny, monkeypatch):
    """A padded batch (left-padded prompts, right-padded responses): every linear layer of the
    blocks sees only the real tokens, and the log-probs and gradients are those of the same layers
    run on every position (padding included), to the rounding of a matmul of other shape."""
    batch, seen = batch_of(tiny, seed=2), []
    n_real = int(batch.mask.sum())
    assert n_real < batch.mask.numel()       # the case: some padding
    hook = tiny.layers[0].mlp.gate_proj.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[:-1].numel()))
    try:
        tiny(batch.ids, attention_mask=batch.mask, upto_layer=1)
    finally:
        hook.remove()
    assert seen == [n_real]

    def grads_and_logp():
        tiny.zero_grad(set_to_none=True)
        logp, _ = bupo.policy_logprobs(tiny, batch, tiny.config.num_layers)
        logp.sum().backward()
        return logp.detach(), {n: p.grad.clone() for n, p in tiny.named_parameters()}
    logp, grads = grads_and_logp()
    monkeypatch.setattr(model_module, "on_tokens", lambda fn, x, real: fn(x))   # every position
    padded_logp, padded = grads_and_logp()
    tiny.zero_grad(set_to_none=True)
    torch.testing.assert_close(logp, padded_logp, rtol=0, atol=1e-6)
    for n in padded:
        torch.testing.assert_close(grads[n], padded[n], rtol=1e-5, atol=1e-7, msg=n)


def test_keep_hidden_holds_only_the_layers_asked_for(tiny):
    ids = torch.tensor([prompts(1, seed=4)[0]])
    h, kept = tiny(ids, upto_layer=3, keep_hidden=(1, 3))
    _, record = tiny(ids, return_residuals=True)
    assert sorted(kept) == [1, 3] and torch.equal(kept[3], h)
    assert torch.equal(kept[1], record.resid[1]) and torch.equal(kept[3], record.resid[3])


def test_train_with_the_memory_flags_trains_the_same(tiny_chat_model, tmp_path, monkeypatch):
    """train.py with --rollout-batch (one group at a time) and --grad-checkpoint: the same
    rewards, lengths and losses as without, step by step."""
    import json

    import tasks
    import train
    monkeypatch.setattr(tasks, "reward", lambda text, answer: float(len(text) % 2))
    base = ["--model", str(tiny_chat_model), "--prompts-per-step", "2", "--group-size", "4",
            "--mini-batches", "2", "--micro-batch-size", "2", "--max-new-tokens", "6",
            "--eval-every", "0", "--lr", "1e-3", "--internal-layer", "2", "--internal-steps", "1",
            "--steps", "2"]
    rows = {}
    for name, extra in (("plain", []), ("lean", ["--rollout-batch", "4", "--grad-checkpoint"])):
        train.main(base + ["--out", str(tmp_path / name), *extra])
        rows[name] = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text()
                      .splitlines()]
    for a, b in zip(rows["plain"], rows["lean"]):
        assert a["reward"] == b["reward"] and a["completions/mean_length"] == b[
            "completions/mean_length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


DATA = __import__("pathlib").Path(__file__).parent / "data"
# the paper's setting: 128 prompts x 8 responses, 1k-token prompts, 8k-token answers, bf16 on CUDA
PAPER = dict(prompts_per_step=128, group_size=8, max_new_tokens=8192, kl_coef=0.0,
             device="cuda", eval_every=10, eval_problems=512, eval_samples=16)
LEAN = dict(rollout_batch=16, micro_batch_size=1, grad_checkpoint=True, eval_batch=1)
PLAIN = dict(rollout_batch=0, micro_batch_size=8, grad_checkpoint=False, eval_batch=0)
SHARDED = dict(LEAN, parallel="fsdp")
OFFLOAD = dict(SHARDED, cpu_offload=True)


def paper_plan(name, world, flags):
    import argparse
    import json

    from infra import memory
    from model import Config
    cfg = Config.from_hf(json.loads((DATA / f"{name}.config.json").read_text()), where=name)
    phases = memory.plan(cfg, argparse.Namespace(**PAPER, **flags), 1024, world, 2)
    return {k: round(sum(v.values()) / 2**30, 1) for k, v in phases.items()}, memory.params(cfg)


@pytest.mark.parametrize("name,world,flags,want,n", [
    # GiB per GPU: rollout, old pass, update, evaluation (docs/scaling.md, "Memory plan")
    ("qwen3-4b", 1, PLAIN, (1383.6, 78.2, 562.6, 10644.6), 4_022_468_096),
    ("qwen3-4b", 1, LEAN, (73.2, 56.4, 80.5, 73.1), 4_022_468_096),
    ("qwen3-4b", 8, PLAIN, (218.8, 78.2, 562.6, 1376.5), 4_022_468_096),
    ("qwen3-4b", 8, LEAN, (73.2, 56.4, 80.5, 73.1), 4_022_468_096),
    ("qwen3-8b", 1, LEAN, (127.7, 111.4, 154.0, 127.5), 8_190_735_360),
    ("qwen3-8b", 8, LEAN, (127.7, 111.4, 154.0, 127.5), 8_190_735_360),
    # --parallel fsdp: 1/8 of the state, plus the full bf16 copy that decodes (infra/fsdp.py)
    ("qwen3-4b", 8, SHARDED, (34.8, 12.2, 24.2, 34.7), 4_022_468_096),
    ("qwen3-8b", 8, SHARDED, (49.5, 21.4, 43.8, 49.3), 8_190_735_360),
    # one GPU, --parallel fsdp --cpu-offload: the fp32 state in CPU memory (60 / 122 GiB there)
    ("qwen3-4b", 1, OFFLOAD, (35.8, 6.5, 16.7, 35.7), 4_022_468_096),
    ("qwen3-8b", 1, OFFLOAD, (51.4, 9.9, 28.6, 51.2), 8_190_735_360),
])
def test_the_memory_plan_at_the_papers_sizes(name, world, flags, want, n):
    """Qwen3-4B and 8B built on the meta device from their config.json keys: the parameter counts,
    and the plan's per-GPU phases on 1 GPU and 8 (data parallel: replicated state, 1/8 of the
    rows; sharded: 1/8 of the state). The replicated state (weights, AdamW, bf16 copies) is 52.4
    GiB for 4B and 106.8 GiB for 8B; sharded over 8 GPUs, 5.6 and 11.4 GiB."""
    got, params = paper_plan(name, world, flags)
    assert params == n
    assert tuple(got[k] for k in ("rollout", "old pass", "update", "evaluation")) == want, got


@pytest.mark.parametrize("name,world,flags,fix", [
    # the flags the command already passes are not advised again; the one that helps is named
    ("qwen3-4b", 1, LEAN, "add --parallel fsdp (the state sharded over the GPUs of torchrun, "
                          "or in CPU memory with --cpu-offload on one GPU)"),
    ("qwen3-4b", 8, LEAN, "add --parallel fsdp"),
    ("qwen3-4b", 1, PLAIN, "add --rollout-batch (fewer rows sampled at a time, a multiple of "
                           "--group-size) and --micro-batch-size 1 and --grad-checkpoint and "
                           "--eval-batch 1"),
    ("qwen3-8b", 1, LEAN, "the weights and AdamW state alone do not fit: --parallel fsdp under "
                          "torchrun with more GPUs, or --parallel fsdp --cpu-offload on one"),
    ("qwen3-8b", 8, dict(SHARDED, rollout_batch=0), "add --rollout-batch"),
])
def test_a_refusal_names_the_flag_that_fits(name, world, flags, fix, monkeypatch):
    """An 80 GB GPU (79.6 GiB): each refusal names a flag the command does not pass yet."""
    import argparse
    import json

    from infra import memory
    from infra.errors import UserError
    from model import Config
    monkeypatch.setattr(memory, "available", lambda device: int(79.6 * 2**30))
    cfg = Config.from_hf(json.loads((DATA / f"{name}.config.json").read_text()), where=name)
    with pytest.raises(UserError) as e:
        memory.check(cfg, argparse.Namespace(**PAPER, **flags), 1024, "cuda", world, 2, False)
    assert fix in str(e.value), str(e.value)


def test_an_old_pass_over_the_limit_names_its_flag_once(monkeypatch):
    """The old pass is a phase of its own: over the limit, with the update, it names
    --micro-batch-size 1 once."""
    import argparse
    import json

    from infra import memory
    from infra.errors import UserError
    from model import Config
    monkeypatch.setattr(memory, "available", lambda device: 2**30)
    cfg = Config.from_hf(json.loads((DATA / "qwen3-4b.config.json").read_text()), where="4b")
    flags = dict(OFFLOAD, micro_batch_size=4, max_new_tokens=512, prompts_per_step=8, eval_every=0)
    with pytest.raises(UserError) as e:
        memory.check(cfg, argparse.Namespace(**{**PAPER, **flags}), 100, "cuda", 1, 2, False)
    assert str(e.value).count("--micro-batch-size 1") == 1, str(e.value)


@pytest.mark.parametrize("name,world,flags", [("qwen3-4b", 1, OFFLOAD), ("qwen3-4b", 8, SHARDED),
                                              ("qwen3-8b", 8, SHARDED), ("qwen3-8b", 1, OFFLOAD)])
def test_the_commands_of_docs_scaling_are_accepted(name, world, flags, monkeypatch):
    """docs/scaling.md's commands for 1 and 8 GPUs of 80 GB fit their plan."""
    import argparse
    import json

    from infra import memory
    from model import Config
    monkeypatch.setattr(memory, "available", lambda device: int(79.6 * 2**30))
    cfg = Config.from_hf(json.loads((DATA / f"{name}.config.json").read_text()), where=name)
    memory.check(cfg, argparse.Namespace(**PAPER, **flags), 1024, "cuda", world, 2, False)


def test_a_run_that_cannot_fit_is_refused_before_any_weight_is_read(default_model_dir, tmp_path):
    """Qwen3-8B's config.json, its MLP widened until training it needs 10x this machine's
    available memory, and no weights at all: train.py is refused with the number, in one line,
    before it looks for the weights (no --out folder made)."""
    import json
    import shutil

    import train
    from infra import cli, memory
    cfg = json.loads((DATA / "qwen3-8b.config.json").read_text())
    # an update holds at least 20 bytes per parameter (fp32 weights, 2 moments, gradients, temps)
    wide = 10 * memory.available("cpu") // (20 * 3 * cfg["hidden_size"] * cfg["num_hidden_layers"])
    d = tmp_path / "huge"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": int(wide) + 1}))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, d / f)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--model", str(d), "--out", str(tmp_path / "run"), "--steps", "2"])
    msg = str(e.value.code)
    assert msg.startswith("error: this run needs about") and "GiB available" in msg, msg
    need, have = (float(x.split()[0]) for x in (msg.split("about ")[1], msg.split("has ")[1]))
    assert need > 9 * have and "\n" not in msg, msg
    assert not (tmp_path / "run").exists()
    # --ignore-memory-plan only warns: the run goes on to the weights (here: there are none)
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--model", str(d), "--out", str(tmp_path / "run"), "--steps", "2",
                             "--ignore-memory-plan"])
    assert "safetensors" in str(e.value.code) and "needs about" not in str(e.value.code)

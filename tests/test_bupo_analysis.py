"""bupo.py's internal policies and entropies, and analyze.py's entropy.json, against direct
computations."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import analyze
import bupo
import reference
from infra import runs
from infra.errors import InputError
from model import Transformer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return Transformer.from_pretrained(tiny_dirs["llama", False])


def pairs_for(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (int(a),), generator=g).tolist(),
             torch.randint(0, 128, (int(b),), generator=g).tolist())
            for a, b in torch.randint(3, 15, (n, 2), generator=g)]


def direct_entropy(logits):
    p = logits.double().softmax(-1)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def test_entropy_extremes():
    V = 151936
    assert bupo.entropy(torch.zeros(3, V)) == pytest.approx(math.log(V), abs=1e-4)
    onehot = torch.zeros(V)
    onehot[7] = 1000.0
    assert bupo.entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)
    z = torch.randn(5, 1000) * 3
    torch.testing.assert_close(bupo.entropy(z).double(), direct_entropy(z), atol=1e-5, rtol=0)
    assert bupo.entropy(z.bfloat16()).dtype == torch.float32  # bf16 logits, fp32 entropy


def test_chunked_equals_unchunked(tiny):
    x = torch.randn(37, tiny.config.hidden_size) * 5
    whole = bupo.policy_entropy(tiny, x, chunk=1000)
    for chunk in (1, 4, 36):
        torch.testing.assert_close(bupo.policy_entropy(tiny, x, chunk=chunk), whole)
    assert bupo.chunk_rows(tiny, budget=8 * 128 * 10) == 10


def test_internal_policies(tiny):
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        logits, rec = tiny(ids, return_residuals=True)
    L = tiny.config.num_layers
    h, tokens = rec.resid[L][:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1)
    # at l = L the internal policy is the model's own: the same log-probs as its logits
    expected = logits[:, :-1].log_softmax(-1).reshape(-1, 128).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(reference.token_logprobs(tiny, h, tokens, layer=L), expected)
    # below L: W_U h_l with no norm at all; the logit lens applies the final norm
    h1 = rec.resid[1].reshape(-1, 64)
    torch.testing.assert_close(bupo.layer_logits(tiny, h1, 1), h1 @ tiny.lm_head.weight.T)
    torch.testing.assert_close(bupo.layer_logits(tiny, h1, 1, norm=True),
                               tiny.lm_head(tiny.norm(h1)))
    lp = reference.token_logprobs(tiny, h1, torch.arange(len(h1)) % 128, layer=1, temperature=0.7)
    rows = torch.arange(len(h1))
    want = ((h1 @ tiny.lm_head.weight.T) / 0.7).log_softmax(-1)[rows, rows % 128]
    torch.testing.assert_close(lp, want)


def test_boundary_layer():
    assert bupo.boundary_layer([0.1, 0.2, -0.1, 0.0]) == 2
    assert bupo.boundary_layer([-0.1, -0.2]) is None
    assert bupo.boundary_layer([0.1, 0.2, 0.3]) == 3


def test_choose_internal_layer_rules():
    # the paper's rule first
    assert bupo.choose_internal_layer([0.1, 0.2, -0.1, -0.3]) == (2, "boundary")
    assert bupo.choose_internal_layer([-0.1, -0.2, -0.1, -0.3]) == (3, "penultimate")  # none: L - 1
    # only L: not internal
    assert bupo.choose_internal_layer([0.1, 0.2, 0.1, 0.3]) == (3, "penultimate")
    # one layer: itself
    assert bupo.choose_internal_layer([0.3]) == (1, "penultimate")


@pytest.mark.parametrize("norm", [False, True])
def test_entropy_json_equals_direct_computation(tiny, norm):
    pairs = pairs_for()
    flow, heat = analyze.analyze(tiny, pairs, norm=norm)
    result = analyze.summarize("tiny", tiny, flow, len(pairs), norm)
    L, W = tiny.config.num_layers, tiny.lm_head.weight.double()
    proj = lambda x: (tiny.norm(x) if norm else x).double() @ W.T  # noqa: E731
    acc = {k: [[] for _ in range(L)] for k in bupo.FLOW_KEYS + ("KL_resid",)}
    policy = []
    for p, r in pairs:  # unchunked, fp64, straight from the residual record
        with torch.no_grad():
            logits, rec = tiny(torch.tensor([p + r]), return_residuals=True)
        s = slice(len(p) - 1, len(p) + len(r) - 1)
        for l in range(1, L + 1):
            out = logits[0, s] if l == L else proj(rec.resid[l][0, s])
            for key, x in (("H_resid_in", proj(rec.resid[l - 1][0, s])),
                           ("H_attn_in", proj(rec.attn_in[l - 1][0, s])),
                           ("H_attn", proj(rec.attn_out[l - 1][0, s])),
                           ("H_mlp_in", proj(rec.mlp_in[l - 1][0, s])),
                           ("H_mlp", proj(rec.mlp_out[l - 1][0, s])), ("H_resid", out)):
                acc[key][l - 1].append(direct_entropy(x))
            # KL(pi^l || pi_theta)
            p, q = out.double().log_softmax(-1), logits[0, s].double().log_softmax(-1)
            acc["KL_resid"][l - 1].append((p.exp() * (p - q)).sum(-1))
        policy.append(direct_entropy(logits[0, s]))
    assert result["num_tokens"] == sum(len(r) for _, r in pairs) and result["num_responses"] == 3
    mean = {k: [torch.cat(v).mean().item() for v in acc[k]] for k in acc}
    for l, row in enumerate(result["layers"]):
        assert row["layer"] == l + 1
        for k in bupo.FLOW_KEYS + ("KL_resid",):
            assert row[k] == pytest.approx(mean[k][l], abs=2e-5), (k, l)
        assert row["dH_attn"] == pytest.approx(mean["H_attn"][l] - mean["H_attn_in"][l], abs=5e-5)
        assert row["dH_mlp"] == pytest.approx(mean["H_mlp"][l] - mean["H_mlp_in"][l], abs=5e-5)
        assert (row["dH_layer"]
                == pytest.approx(mean["H_resid"][l] - mean["H_resid_in"][l], abs=5e-5))
    assert result["H_policy"] == pytest.approx(torch.cat(policy).mean().item(), abs=2e-5)
    assert (result["boundary_layer"]
            == bupo.boundary_layer([row["dH_mlp"] for row in result["layers"]]))
    assert (result["internal_layer"], result["internal_layer_rule"]) == bupo.choose_internal_layer(
        [row["dH_mlp"] for row in result["layers"]])
    assert "closest_layer" not in result      # the rejected rule lives in experiments/
    assert (result["layers"][-1]["KL_resid"] == 0
            and min(r["KL_resid"] for r in result["layers"][:-1]) > 0)
    assert len(heat["entropy"]) == L + 1 and heat["targets"] == pairs[0][1]


def test_auto_layer_follows_the_current_rule(tmp_path, capsys):
    """--internal-layer auto with --analysis re-applies bupo.choose_internal_layer to the file's
    dH_mlp, so an entropy.json written by older code (its internal_layer picked by the closest-layer
    rule) gives today's layer."""
    from types import SimpleNamespace
    model = SimpleNamespace(config=SimpleNamespace(num_layers=4))
    old = {"num_layers": 4, "internal_layer": 2, "internal_layer_rule": "closest", "norm": "none",
           "layers": [{"layer": l, "dH_mlp": -0.1, "KL_resid": k}
                      for l, k in ((1, 9.0), (2, 3.0), (3, 5.0), (4, 0.0))]}
    f = tmp_path / "entropy.json"
    f.write_text(json.dumps(old))
    args = SimpleNamespace(analysis=str(f))
    assert analyze.resolve_layer("auto", model, None, args) == 3
    err = capsys.readouterr().err
    assert "internal layer: 3 of 4, no boundary layer below L, so the penultimate layer" in err
    old["layers"][1]["dH_mlp"] = 0.2                                     # a boundary layer at 2
    f.write_text(json.dumps(old))
    assert (analyze.resolve_layer("auto", model, None, args) == 2
            and "the boundary layer" in capsys.readouterr().err)
    assert analyze.resolve_layer("3", model, None, args) == 3           # a number is taken as given


def test_entropy_json_matches_transformers_hidden_states(default_model_dir):
    """The paper's definitions computed from transformers' own tensors (hooks), not from our
    record."""
    from transformers import AutoModelForCausalLM

    from analyze import load
    model, tok = load(default_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    q = tok.encode_chat([{"role": "user", "content": "How many legs does a spider have?"}])
    pairs = [(q, tok.encode("A spider has eight legs.<|im_end|>"))]
    result = analyze.summarize("smollm2", model, analyze.analyze(model, pairs)[0], 1, False)
    seen = {}
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        for name, mod in (("attn_in", layer.input_layernorm), ("attn", layer.self_attn),
                          ("mlp_in", layer.post_attention_layernorm), ("mlp", layer.mlp)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, out, key=(name, i):
                    seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)))
    with torch.no_grad():
        out = hf(torch.tensor([pairs[0][0] + pairs[0][1]]), output_hidden_states=True)
    for h in hooks:
        h.remove()
    W, L = hf.lm_head.weight, hf.config.num_hidden_layers
    s = slice(len(pairs[0][0]) - 1, len(pairs[0][0]) + len(pairs[0][1]) - 1)
    H = lambda x: direct_entropy(x[0, s] @ W.T).mean().item()  # noqa: E731
    for l in range(1, L + 1):
        row = result["layers"][l - 1]
        assert row["H_resid_in"] == pytest.approx(H(out.hidden_states[l - 1]), abs=1e-3)
        assert row["H_attn_in"] == pytest.approx(H(seen["attn_in", l - 1]), abs=1e-3)
        assert row["H_attn"] == pytest.approx(H(seen["attn", l - 1]), abs=1e-3)
        assert row["H_mlp_in"] == pytest.approx(H(seen["mlp_in", l - 1]), abs=1e-3)
        assert row["H_mlp"] == pytest.approx(H(seen["mlp", l - 1]), abs=1e-3)
        if l < L:
            # KL(pi^l || pi_theta), pi_theta from transformers' logits; a relative tolerance (tens
            # of nats)
            p = (out.hidden_states[l][0, s] @ W.T).double().log_softmax(-1)
            q = out.logits[0, s].double().log_softmax(-1)
            assert (row["KL_resid"]
                    == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-4, abs=1e-3))
    # hidden_states[L] is transformers' normed last state, i.e. the model's policy
    assert result["layers"][-1]["H_resid"] == pytest.approx(H(out.hidden_states[L]), abs=1e-3)
    assert (result["H_policy"]
            == pytest.approx(direct_entropy(out.logits[0, s]).mean().item(), abs=1e-3))


def test_read_responses(tmp_path, default_model_dir):
    from tokenizer import Tokenizer
    tok = Tokenizer(default_model_dir)
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt_ids": [1, 2, 3], "response_ids": [4, 5]}\n\n{"prompt": "Hi", '
                 '"response": "Hello!"}\n')
    pairs = analyze.read_responses(f, tok)
    assert pairs[0] == ([1, 2, 3], [4, 5])
    assert pairs[1] == (tok.encode_chat([{"role": "user", "content": "Hi"}]), tok.encode("Hello!"))
    for bad, msg in (('{"prompt_ids": [1], "response_ids": [2]}\n{"prompt": 3}\n',
                      "r.jsonl:2: expected"),
                     ('{"prompt_ids": [1], "response_ids": [2]}\nnot json\n',
                      "r.jsonl:2: not valid JSON"),
                     ('{"prompt_ids": [1], "response_ids": []}\n',
                      "r.jsonl:1: prompt_ids and response_ids"),
                     ('{"prompt_ids": [1, "x"], "response_ids": [2]}\n', "r.jsonl:1:"),
                     ("\n", "no records")):
        f.write_text(bad)
        with pytest.raises(InputError, match=msg):
            analyze.read_responses(f, tok)


def test_cli_end_to_end_and_errors(tiny_chat_model, tmp_path):
    # a tiny model with the default model's tokenizer (and vocabulary size)
    d = tiny_chat_model
    f = tmp_path / "r.jsonl"
    f.write_text("\n".join(json.dumps({"prompt_ids": p, "response_ids": r})
                           for p, r in pairs_for(1)) + "\n")

    def run(*a):
        return subprocess.run([sys.executable, str(ROOT / "analyze.py"), "--model", str(d), *a],
                              capture_output=True, text=True)
    r = run("--out", str(tmp_path / "a"), "--responses", str(f))
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "a" / "entropy.json").read_text())
    assert result["num_layers"] == 3 and len(result["layers"]) == 3 and result["norm"] == "none"
    assert all((tmp_path / "a" / n).stat().st_size > 1000
               for n in ("flow.png", "dH.png", "heatmap.png"))
    r = run("--out", str(tmp_path / "b"), "--responses", str(f), "--norm", "final", "--compare",
            str(tmp_path / "a" / "entropy.json"))
    assert r.returncode == 0, r.stderr
    f.write_text('{"prompt_ids": [1], "response_ids": [2]}\n{"oops": 1}\n')
    r = run("--out", str(tmp_path / "c"), "--responses", str(f))
    assert (r.returncode != 0 and r.stderr.startswith("error:") and ":2:" in r.stderr
            and "Traceback" not in r.stderr)


def test_what_training_changed_layer_by_layer(tiny_dirs):
    """analyze.layer_changes: a model against itself changes nothing; after one BuPO phase-1
    update at l = 1, the blocks above l have not moved, layer 1 has, and so has its policy."""
    base = Transformer.from_pretrained(tiny_dirs["llama", False])
    pairs = pairs_for()
    keys = ("kl", "dH", "dKL_policy", "dcos", "attn", "mlp")
    same = analyze.layer_changes(base, base, pairs)
    assert len(same) == 3 and all(r[k] == 0 for r in same for k in keys), same
    trained = Transformer.from_pretrained(tiny_dirs["llama", False])
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    logp, _ = bupo.policy_logprobs(trained, bupo.Batch(ids, torch.ones_like(ids), 4), 1)
    (-logp.sum()).backward()
    torch.optim.AdamW(trained.parameters(), lr=1e-2).step()
    rows = analyze.layer_changes(base, trained, pairs)
    assert rows[0]["attn"] > 0 and rows[0]["mlp"] > 0 and rows[0]["kl"] > 0
    assert all(r["attn"] == 0 and r["mlp"] == 0 for r in rows[1:]), rows
    assert all(math.isfinite(r[k]) for r in rows for k in keys)


def test_analyze_against_a_checkpoint(tiny_chat_model, tiny_dirs, tmp_path):
    """analyze.py --against: changes.json and changes.png beside the entropy flow, the run's layer
    read from the checkpoint; a checkpoint of another model is refused in one line, up front."""
    import train
    train.main(["--model", str(tiny_chat_model), "--out", str(tmp_path / "run"), "--steps", "1",
                "--internal-steps", "1", "--internal-layer", "2", "--prompts-per-step", "2",
                "--group-size", "2", "--mini-batches", "2", "--max-new-tokens", "4",
                "--eval-every", "0", "--lr", "1e-2"])
    ckpt = tmp_path / "run" / "checkpoints" / "step_000001"
    base = ["analyze.py", "--model", str(tiny_chat_model), "-n", "2", "--max-new-tokens", "4",
            "--task", "add", "--device", "cpu"]
    done = subprocess.run([sys.executable, *base, "--against", str(ckpt), "--out",
                           str(tmp_path / "a")], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "a" / "changes.json").read_text())
    assert result["run"] == {"step": 1, "algo": "bupo", "internal_layer": 2, "internal_steps": 1}
    assert len(result["layers"]) == 3 and result["layers"][2]["attn"] == 0     # above l = 2
    assert result["layers"][0]["attn"] > 0 and (tmp_path / "a" / "changes.png").stat().st_size
    # the command and the code that made it
    assert result["command"] == ["analyze.py", *base[1:], "--against", str(ckpt), "--out",
                                 str(tmp_path / "a")]
    assert result["code"] == runs.code_version()
    # without the optimizer state (removed to save disk) the run's args.json and metrics tell
    (ckpt / "trainer_state.pt").unlink()
    assert analyze.run_of(ckpt, 3) == result["run"]
    assert analyze.run_of(tiny_chat_model, 3) == {}                       # a bare model folder
    (tmp_path / "run" / "args.json").write_text("{not json")
    assert analyze.run_of(ckpt, 3) == {}                                  # a damaged run folder
    bad = subprocess.run([sys.executable, *base, "--against", str(tiny_dirs["qwen3", False]),
                          "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1, bad.stderr
    assert "is not --model's" in bad.stderr and not (tmp_path / "b").exists()

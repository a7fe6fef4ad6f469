"""rollout.py: greedy parity with transformers, batch invariance, cached log-probs, stops,
filters."""
import pytest
import torch

import model as model_module
import rollout
from tokenizer import Tokenizer
from model import Transformer
from rollout import filter_logits, generate, prefill, sample

QUESTIONS = ["What is the capital of France?", "Name a prime number larger than 10.",
             "Say hello in French."]


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    return Transformer.from_pretrained(tiny_dirs["qwen3", True])


def tiny_prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 12, (n,), generator=g)]


def hf_greedy(hf, ids, n, eos):
    out = hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                      pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_matches_transformers_default_model(default_model_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    ours, tok = Transformer.from_pretrained(default_model_dir), Tokenizer(default_model_dir)
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    ro = generate(ours, prompts, 1, 24, temperature=0.0, stop_ids=tok.stop_ids, pad_id=tok.pad_id,
                  tokenizer=tok)
    for i, p in enumerate(prompts):  # ours in one padded batch, transformers one prompt at a time
        assert ro.records()[i]["response_ids"] == hf_greedy(hf, p, 24, sorted(tok.stop_ids))
    assert "Paris" in ro.text[0]


def test_greedy_matches_transformers_tiny_qwen3(tiny):
    from conftest import make_hf_model
    hf = make_hf_model("qwen3", tied=True)
    prompts = tiny_prompts()
    ro = generate(tiny, prompts, 2, 20, temperature=0.0)
    for i, p in enumerate(prompts):
        ref = hf_greedy(hf, p, 20, None)
        assert (ro.records()[2 * i]["response_ids"] == ref
                and ro.records()[2 * i + 1]["response_ids"] == ref)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_each_prompt_alone(tiny, temperature):
    prompts = tiny_prompts(4, seed=1)
    # frequent stops: rows finish at different times and the cache is compacted
    stop = set(range(0, 128, 9))
    batch = generate(tiny, prompts, 3, 30, temperature=temperature, stop_ids=stop,
                     seed=100).records()
    for i, p in enumerate(prompts):  # prompt i of a call samples with seed + i
        alone = generate(tiny, [p], 3, 30, temperature=temperature, stop_ids=stop,
                         seed=100 + i).records()
        for j in range(3):
            b, a = batch[3 * i + j], alone[j]
            assert (b["response_ids"] == a["response_ids"]
                    and b["finish_reason"] == a["finish_reason"])
            assert b["logprobs"] == pytest.approx(a["logprobs"], abs=1e-5)
    assert len({tuple(r["response_ids"]) for r in batch}) > len(prompts) or temperature == 0.0
    # a list of seeds: what a data-parallel rank passes for its share (prompts 1 and 3 of the call
    # above)
    share = generate(tiny, [prompts[1], prompts[3]], 3, 30, temperature=temperature, stop_ids=stop,
                     seed=[101, 103]).records()
    assert ([r["response_ids"] for r in share]
            == [r["response_ids"] for r in batch[3:6] + batch[9:12]])


def test_logprobs_equal_a_fresh_forward_pass(tiny):
    prompts = tiny_prompts(3, seed=2)
    ro = generate(tiny, prompts, 4, 25, temperature=1.0, stop_ids={5, 17, 33}, seed=7)
    for r in ro.records():
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logp = tiny(ids).float().log_softmax(-1)[0]
        P = len(r["prompt_ids"])
        # token t of the response is predicted at position P + t - 1
        expected = logp[P - 1:-1].gather(-1, torch.tensor(r["response_ids"])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r["logprobs"]), expected, atol=1e-4, rtol=0)


def test_stop_handling_padding_and_masks(tiny):
    stop = set(range(0, 128, 4))
    ro = generate(tiny, tiny_prompts(3, seed=3), 4, 40, temperature=1.0, stop_ids=stop, pad_id=0,
                  seed=3)
    reasons = set()
    for i in range(len(ro)):
        n = int(ro.response_mask[i].sum())
        ids, reason = ro.response_ids[i].tolist(), ro.finish_reason[i]
        reasons.add(reason)
        # mask is a prefix
        assert ro.response_mask[i, :n].all() and not ro.response_mask[i, n:].any()
        # padded after the end
        assert all(t == 0 for t in ids[n:]) and (ro.logprobs[i, n:] == 0).all()
        # nothing after a stop
        assert all(t not in stop for t in ids[:n - 1])
        if reason == "stop":
            assert ids[n - 1] in stop
        else:
            assert reason == "length" and n == 40
    assert "stop" in reasons
    assert ro.response_ids.shape[1] == int(ro.response_mask.sum(1).max())


def test_cache_allocated_once(tiny, monkeypatch):
    made = []
    real = model_module.KVCache.__init__
    monkeypatch.setattr(model_module.KVCache, "__init__", lambda self, *a,
                        **k: (made.append(a), real(self, *a, **k))[1])
    generate(tiny, tiny_prompts(2), 4, 30, stop_ids=set(range(0, 128, 5)))
    # one cache for the prefill of the P prompts, one for the P * G rows: none while decoding
    assert [(a[1], a[2]) for a in made] == [(2, made[0][2]), (8, made[0][2] + 30)]


def test_filters_keep_exactly_their_sets():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    def kept(**kw):
        return torch.isfinite(filter_logits(logits, **kw))[0].nonzero()[:, 0].tolist()
    assert kept(top_k=1) == [0] and kept(top_k=3) == [0, 1, 2] and kept(top_k=10) == [0, 1, 2, 3]
    assert kept(top_p=0.5) == [0] and kept(top_p=0.7) == [0, 1] and kept(top_p=0.8) == [0, 1]
    assert kept(top_p=0.81) == [0, 1, 2] and kept(top_p=1.0) == [0, 1, 2, 3]
    assert kept(min_p=0.5) == [0, 1] and kept(min_p=0.2) == [0, 1, 2]
    assert kept(top_k=3, top_p=0.7) == [0, 1]


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.3)])
def test_sampling_never_leaves_the_filtered_set(tiny, kw):
    ro = generate(tiny, tiny_prompts(2, seed=4), 8, 20, temperature=1.0, seed=11, **kw)
    for r in ro.records():
        ids = torch.tensor([r["prompt_ids"] + r["response_ids"]])
        with torch.no_grad():
            logits = tiny(ids).float()[0]
        P = len(r["prompt_ids"])
        allowed = torch.isfinite(filter_logits(logits[P - 1:-1], **kw))
        assert allowed.gather(-1, torch.tensor(r["response_ids"])[:, None]).all()


def test_sample_follows_the_distribution():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1, 0.0])
    n = 20000
    u = rollout.uniforms(rollout.row_keys(range(n), 1, "cpu"), 0)
    tok, lp = sample(probs.log().expand(n, -1).clone(), u)
    freq = torch.bincount(tok, minlength=5).float() / n
    assert freq[4] == 0
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)
    torch.testing.assert_close(lp, probs.log()[tok])


def test_seeds_reproduce(tiny):
    p = tiny_prompts(2)
    a, b = generate(tiny, p, 2, 15, seed=5), generate(tiny, p, 2, 15, seed=5)
    c = generate(tiny, p, 2, 15, seed=6)
    assert (torch.equal(a.response_ids, b.response_ids)
            and not torch.equal(a.response_ids, c.response_ids))


def test_a_shared_prefill_gives_the_same_rollouts(tiny):
    """evaluate() prefills its prompts once for a greedy and a sampled call: each must equal the
    call that prefills alone, bit for bit, and neither may change the prefill it was given."""
    p = tiny_prompts(3, seed=2)
    pre = prefill(tiny, p, pad_id=0)
    kept = [t.clone()
            for t in (pre.logits, pre.cache.k, pre.cache.v, pre.cache.valid, pre.cache.pos)]
    for kw in (dict(group_size=1, temperature=0.0), dict(group_size=4, temperature=1.0, seed=7),
               dict(group_size=1, temperature=0.0)):
        shared = generate(tiny, pre, max_new_tokens=12, **kw)
        alone = generate(tiny, p, max_new_tokens=12, **kw)
        for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "logprobs",
                     "group"):
            assert torch.equal(getattr(shared, name), getattr(alone, name)), name
    after = (pre.logits, pre.cache.k, pre.cache.v, pre.cache.valid, pre.cache.pos)
    assert all(torch.equal(a, b) for a, b in zip(kept, after))
    # the last call frees the prefill's cache, and samples the same
    pre.release = True
    last = generate(tiny, pre, max_new_tokens=12, group_size=4, temperature=1.0, seed=7)
    assert pre.cache is None
    assert torch.equal(last.response_ids, generate(tiny, p, 4, 12, seed=7).response_ids)


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        generate(tiny, [[1, 2], []], 2, 5)
    with pytest.raises(ValueError, match="must be at least 1"):
        generate(tiny, [[1, 2]], 2, 0)
    with pytest.raises(ValueError, match="give one seed per prompt"):
        generate(tiny, [[1, 2], [3]], 2, 5, seed=[1])


def test_static_cache_decodes_like_the_dynamic_one(tiny, monkeypatch):
    """generate(compile=True) decodes over a StaticKVCache (all slots attended, masked; the slot a
    tensor). With torch.compile replaced by the identity, that path runs eagerly: it must give the
    tokens of the usual cache, through stops and cache compactions (a quarter of the rows stopping),
    greedy and sampled."""
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    stop = set(range(0, 128, 4))
    for temperature in (0.0, 1.0):
        kw = dict(group_size=4, max_new_tokens=40, temperature=temperature, stop_ids=stop,
                  pad_id=0, seed=5)
        want = generate(tiny, tiny_prompts(3, seed=4), **kw)
        got = generate(tiny, tiny_prompts(3, seed=4), compile=True, **kw)
        assert want.finish_reason.count("stop") >= 3            # compaction happened
        assert (torch.equal(got.response_ids, want.response_ids)
                and got.finish_reason == want.finish_reason)
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)


def test_a_compiled_decode_step_is_one_graph(tiny):
    """The decode step that compile=True compiles (on a GPU, replayed as a CUDA graph) traces into
    one graph: a graph break is Python reading a tensor's value, a host sync that would stall a GPU
    at every token and rule a CUDA graph out. Traced by dynamo alone: no C++ compiler needed."""
    import torch._dynamo
    pre = prefill(tiny, tiny_prompts(3, seed=4))
    cache = rollout.copy_to_groups(tiny, pre.cache, 2, 32, static=True)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch._dynamo.explain(tiny)(torch.full((6, 1), 5), cache=cache, last_only=True)
    torch._dynamo.reset()
    assert out.graph_break_count == 0 and out.graph_count == 1, out.break_reasons


def test_compile_unavailable_is_one_line_and_eager(tiny_dirs, monkeypatch, capsys):
    import torch._dynamo.exc
    # a model of its own: nothing cached yet
    model = Transformer.from_pretrained(tiny_dirs["qwen3", True])

    def broken(*a, **k):
        raise torch._dynamo.exc.BackendCompilerFailed(broken,
                                                      RuntimeError("no C++ compiler found\nmore"),
                                                      None)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: broken)
    got = generate(model, tiny_prompts(2), 2, 12, stop_ids={3}, seed=1, compile=True)
    want = generate(model, tiny_prompts(2), 2, 12, stop_ids={3}, seed=1)
    assert torch.equal(got.response_ids, want.response_ids)
    err = capsys.readouterr().err
    assert (err.count("\n") == 1
            and err.startswith("warning: torch.compile is not available here")
            and "Traceback" not in err)


def test_a_large_seed_samples_and_repeats():
    """--seed 1700000000 (a Unix time) once overflowed the generator's 64-bit seed mid-run; small
    seeds keep their streams exactly."""
    import rollout
    assert rollout.row_seed(5, 3) == (5 << 20) + 3
    big = [rollout.row_seed((1_700_000_000 << 32) + g, j) for g in range(3) for j in range(4)]
    assert all(0 <= b < 2**64 for b in big) and len(set(big)) == len(big)
    assert rollout.row_seed(2**60, 1) == rollout.row_seed(2**60, 1) != rollout.row_seed(2**60, 2)


def test_philox_known_answers():
    """Philox4x32-10 against the known-answer vectors of Random123 (kat_vectors), on ints and on
    tensors."""
    M = 0xFFFFFFFF
    cases = [([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
             ([M] * 4, [M, M], [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
             ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
              [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1])]
    for ctr, key, want in cases:
        assert rollout.philox(ctr, key) == want
    ctr = [torch.tensor([c[0][i] for c in cases]) for i in range(4)]
    key = [torch.tensor([c[1][i] for c in cases]) for i in range(2)]
    got = torch.stack(rollout.philox(ctr, key), 1)
    assert got.tolist() == [c[2] for c in cases]


def test_uniforms_are_each_rows_own_and_uniform():
    keys = rollout.row_keys([3, 4], 5, "cpu")
    u = torch.stack([rollout.uniforms(keys, t) for t in range(2000)])     # [T, 10]
    # a row's number depends on its key and t only: any subset of rows draws the same numbers
    assert torch.equal(rollout.uniforms(keys[[7, 2]], 11), u[11, [7, 2]])
    assert u.dtype == torch.float64 and (u >= 0).all() and (u < 1).all()
    assert len(set(u.flatten().tolist())) == u.numel()
    # mean 1/2, variance 1/12, and no correlation between rows or between consecutive tokens
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    c = torch.corrcoef(torch.cat([u[:-1], u[1:, :1]], 1).T)
    assert (c - torch.eye(11, dtype=c.dtype)).abs().max() < 0.1


def test_inverse_cdf_is_the_plain_one():
    """The two-level search (block sums, then inside one block) picks the token a full fp64
    cumulative sum picks, on a vocabulary that is not a multiple of the block, with zeros."""
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 1000, generator=g) ** 4
    probs[:, 300:700] = 0
    probs[:, -1] = 0
    probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(64, generator=g, dtype=torch.float64)
    u[:4] = torch.tensor([0.0, 1 - 2**-53, 0.5, 0.999999], dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    x = torch.minimum(u * cdf[:, -1], cdf[:, -1].nextafter(torch.zeros_like(u)))
    want = torch.searchsorted(cdf, x[:, None], right=True)[:, 0]
    got = rollout.inverse_cdf(probs, u)
    assert (got == want).float().mean() > 0.95 and (probs.gather(-1, got[:, None]) > 0).all()
    # away from a boundary (where fp32 block sums may round across it) the two agree exactly
    gap = (cdf - x[:, None]).abs().min(-1).values
    assert torch.equal(got[gap > 1e-6], want[gap > 1e-6])


def test_stopped_rows_skip_the_linear_layers_and_the_unembedding(tiny):
    """On a CPU (the host sees the stops at every token) a decode step runs the blocks' linear
    layers and the unembedding on the rows still running only, not on the stopped rows the cache
    still holds until it is compacted; the tokens are those of feeding every row (the test
    below, which looks every k tokens and marks nothing)."""
    prompts, seen = tiny_prompts(4, seed=1), {"mlp": [], "head": []}
    hooks = [tiny.layers[0].mlp.gate_proj.register_forward_hook(
                 lambda m, args, out: seen["mlp"].append(args[0].shape[:-1].numel())),
             # the unembedding's final norm: a CPU decode step multiplies by W_U itself
             tiny.norm.register_forward_hook(
                 lambda m, args, out: seen["head"].append(args[0].shape[:-1].numel()))]
    try:
        ro = generate(tiny, prompts, 3, 30, stop_ids=set(range(0, 128, 9)), seed=100)
    finally:
        for h in hooks:
            h.remove()
    length = ro.response_mask.sum(1)
    # the decode forward after token t feeds the rows that did not stop at or before it
    alive = [int((length > t + 1).sum()) for t in range(29)]
    alive = [n for n in alive if n > 0]
    assert 0 < min(alive) < len(ro) and len(set(alive)) > 2     # the case: rows stop one by one
    assert seen["mlp"] == [sum(map(len, prompts))] + alive      # prefill: the real prompt tokens
    assert seen["head"] == [len(prompts)] + alive               # prefill: each prompt's last one


@pytest.mark.parametrize("every", [3, 8])
def test_looking_every_k_tokens_samples_the_same(tiny, monkeypatch, every):
    """The host reads the stop bookkeeping every k tokens on a GPU: the same tokens, log-probs
    and stops as looking at every token (rows that stopped between two looks are ignored)."""
    prompts = tiny_prompts(4, seed=1)
    stop = set(range(0, 128, 9))
    base = generate(tiny, prompts, 3, 30, stop_ids=stop, seed=100)
    monkeypatch.setattr(rollout, "sync_every", lambda device: every)
    got = generate(tiny, prompts, 3, 30, stop_ids=stop, seed=100)
    assert torch.equal(got.response_ids, base.response_ids)
    assert torch.equal(got.response_mask, base.response_mask)
    assert got.finish_reason == base.finish_reason
    torch.testing.assert_close(got.logprobs, base.logprobs, atol=1e-5, rtol=0)


def test_a_cpu_decode_step_unembeds_the_same_sums_in_the_other_layout(tiny):
    """Pass.unembed of a decode step on a CPU takes W_U x^T, transposed back: the logits of
    lm_head(norm(x)) to rounding, for every row count, with and without stopped rows."""
    for rows in (1, 2, 5, 8, 11, 12, 33):
        h = torch.randn(rows, 1, tiny.config.hidden_size)
        want = tiny.lm_head(tiny.norm(h))
        mask = torch.ones(rows, 1, dtype=torch.bool)
        run = model_module.Pass.of(tiny, torch.zeros(rows, 1, dtype=torch.long), mask, None, False)
        got = run.unembed(tiny, h)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if rows > 2:          # the stopped rows marked as padding: zeros there, the rest alike
            mask[::2] = False
            run = model_module.Pass.of(tiny, torch.zeros(rows, 1, dtype=torch.long), mask, None,
                                       False)
            got = run.unembed(tiny, h)
            torch.testing.assert_close(got[1::2], want[1::2], rtol=1e-5, atol=1e-5)
            assert not got[::2].any()

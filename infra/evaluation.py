"""
Held-out evaluation, as train.py runs it before training, every --eval-every steps and at the end:
greedy accuracy, avg@n and the unbiased pass@k = 1 - C(n-c, k) / C(n, k) over n = --eval-samples
samples at T, on the generated task's test split and on each --eval-data benchmark. A data-parallel
rank answers every W-th problem; the sums are taken over all ranks.
"""
import contextlib
import math
import time

import torch

import tasks
from infra import distributed as dp
from infra import fsdp
from rollout import generate, prefill


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tok, src, args, amp=contextlib.nullcontext) -> dict:
    """Held-out accuracy: the generated task's test split (eval/greedy_acc, eval/avg@n,
    eval/pass@k) and each --eval-data benchmark (eval/<name>/...); amp: the autocast region of
    this forward-only phase."""
    t0 = time.perf_counter()
    out = {}
    # a sharded model answers from a full copy in the compute dtype (infra/fsdp.py)
    model = fsdp.sampling_model(model, args)
    with amp():
        for name, problems in src.eval_sets(args.eval_problems, args.seed).items():
            greedy = not name or args.eval_greedy
            prefix = f"eval/{name}/" if name else "eval/"
            out.update({prefix + k: v for k, v in
                        eval_set(model, tok, src, problems, args, greedy).items()})
    return {**out, "eval_time": time.perf_counter() - t0}


def eval_set(model, tok, src, problems, args, greedy: bool) -> dict:
    """greedy_acc (when asked), avg@n and the unbiased pass@k for k = 1, 2, 4, ..., n over n =
    --eval-samples samples at T, of one set of problems."""
    mine = dp.my_share(len(problems))         # a data-parallel rank answers every W-th problem
    prompts = [src.encode(tok, problems[g]) for g in mine]
    common = dict(stop_ids=tok.stop_ids, pad_id=tok.pad_id, tokenizer=tok, progress=dp.rank() == 0,
                  compile=args.compile)
    n, size = args.eval_samples, args.eval_batch or len(prompts)
    greedy_right, c = 0, []                   # c: right samples per problem, of n
    for i in range(0, len(prompts), size):    # a chunk of problems at a time (--eval-batch)
        mine_i = mine[i:i + size]
        part = prefill(model, prompts[i:i + size], tok.pad_id)   # one prefill for both calls
        if greedy:
            ro = generate(model, part, 1, args.max_new_tokens, temperature=0.0, **common)
            greedy_right += sum(tasks.reward(t, problems[g].answer)
                                for t, g in zip(ro.text, mine_i))
        part.release = True                   # the last use: freed before decoding
        # a seed per problem: any chunking samples the same
        ro = generate(model, part, n, args.max_new_tokens, temperature=args.temperature,
                      seed=[12345 + g for g in mine_i], **common)
        right = [0] * len(mine_i)
        for t, g in zip(ro.text, ro.group.tolist()):
            right[g] += int(tasks.reward(t, problems[mine_i[g]].answer))
        c += right
    ks = sorted({2**j for j in range(n.bit_length()) if 2**j <= n} | {n})
    sums = dp.all_sum({"greedy": greedy_right, "correct": sum(c),
                       **{f"pass@{k}": sum(pass_at_k(n, ci, k) for ci in c) for k in ks}},
                      next(model.parameters()).device)
    P = len(problems)
    return {**({"greedy_acc": sums["greedy"] / P} if greedy else {}),
            f"avg@{n}": sums["correct"] / (P * n),
            **{f"pass@{k}": sums[f"pass@{k}"] / P for k in ks}}

"""
Chat answers from a model folder, with the same sampler as the RL rollouts
(rollout.generate): one greedy answer by default, or G sampled answers with their lengths
and log-probs.

    python chat.py --prompt "What is the capital of France?"
    python chat.py --model path/to/hf-folder --prompt "..." --system "..." --temperature
    0.7 python chat.py -G 4 --temperature 1 --prompt "What is 7 * 8? Answer in \\boxed{}."

It renders the model's own chat template (tokenizer.py); temperature 0 is greedy decoding.
"""
import sys
import time

from infra import cli, weights
from infra.errors import UserError


def parse_args(argv=None):
    p = cli.Parser(description="Chat answers from a model folder, with the rollout sampler.")
    cli.add_model_args(p)
    g = p.add_argument_group("chat")
    g.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    g.add_argument("--system", default=None,
                   help="optional system message (default: the template's own)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    g = p.add_argument_group("sampling")
    g.add_argument("-G", "--group-size", type=int, default=1,
                   help="answers to sample; more than 1 prints each with its length and log-prob")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling mass, in (0, 1] (1 = off)")
    g.add_argument("--min-p", type=float, default=0.0,
                   help="drop tokens below min_p * the top probability (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler when --temperature > 0")
    g.add_argument("--compile", action="store_true",
                   help="compile the decode step (slower on a CPU; docs/usage.md, 'Sampling')")
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before the model is loaded."""
    cli.positive(args, "--group-size", "--max-new-tokens")
    cli.sampling(args, training=False)
    cli.check_device(args.device)
    if not args.prompt:
        raise UserError("--prompt is empty; give the user message")


def main(argv=None):
    import torch

    from model import Transformer
    from rollout import generate
    from tokenizer import Tokenizer
    args = parse_args(argv)
    check_args(args)
    weights.ensure_if_default(args.model)      # the default model is built on first use
    model = Transformer.from_pretrained(args.model, getattr(torch, args.dtype), args.device)
    tok = Tokenizer(args.model, model.config)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    ids = tok.encode_chat(messages)
    cli.fits_context(len(ids), args.max_new_tokens, model.config.max_position_embeddings)
    t0 = time.perf_counter()
    ro = generate(model, [ids], args.group_size, args.max_new_tokens, args.temperature,
                  args.top_k, args.top_p, args.min_p, tok.stop_ids, tok.pad_id, args.seed, tok,
                  progress=args.group_size > 1, compile=args.compile)
    if args.group_size == 1:
        print(ro.text[0])
        return
    for i, r in enumerate(ro.records()):
        print(f"--- {i} ({len(r['response_ids'])} tokens, {r['finish_reason']}, "
              f"mean log-prob {sum(r['logprobs']) / len(r['logprobs']):.3f})\n{r['text']}")
    print(f"--- {int(ro.response_mask.sum())} tokens in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])

"""
A chat answer from a model folder, to see a model work: greedy by default, sampled with
--temperature > 0.

    python chat.py --prompt "What is the capital of France?"
    python chat.py --model path/to/hf-folder --prompt "..." --system "..." --temperature 0.7

It renders the model's own chat template (tokenizer.py) and decodes with the same sampler as the RL
rollouts (rollout.generate; temperature 0 is greedy decoding).
"""
import sys

from infra import cli
from infra.errors import UserError


def parse_args(argv=None):
    p = cli.Parser(description="Greedy (or sampled) chat answer from a model folder.")
    cli.add_model_args(p)
    g = p.add_argument_group("chat")
    g.add_argument("--prompt", default="What is the capital of France?", help="the user message")
    g.add_argument("--system", default=None,
                   help="optional system message (default: the template's own)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many new tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy decoding")
    g.add_argument("--seed", type=int, default=0, help="seed of the sampler when --temperature > 0")
    return p.parse_args(argv)


def check_args(args):
    """Every argument, before the model is loaded."""
    cli.positive(args, "--max-new-tokens")
    cli.sampling(args, training=False)
    cli.check_device(args.device)
    if not args.prompt:
        raise UserError("--prompt is empty; give the user message")


def main(argv=None):
    import torch

    from rollout import generate
    args = parse_args(argv)
    check_args(args)
    model, tok = cli.load(args.model, getattr(torch, args.dtype), args.device)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": args.prompt}]
    ids = tok.encode_chat(messages)
    cli.fits_context(len(ids), args.max_new_tokens, model.config.max_position_embeddings)
    ro = generate(model, [ids], 1, args.max_new_tokens, args.temperature, stop_ids=tok.stop_ids,
                  pad_id=tok.pad_id, seed=args.seed, tokenizer=tok)
    print(ro.text[0])


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])

"""
What the command-line tools share: a parser whose errors are one line, the argument checks, the
model flags, loading a model folder (building the default model on first use), and the rule for
ending a command.

The rule, for every tool: expected bad input ends as `error: <what> <where> <what to do>` on one
line and a non-zero exit code, checked before anything is written or loaded; Ctrl-C ends with one
line; a traceback means a bug. Each tool checks its own arguments in one function next to its parser
(`check_args`), with the helpers below.
"""
import argparse
import math
import os
import signal
import sys
from pathlib import Path

from infra.errors import UserError


class _ShowDefaults(argparse.HelpFormatter):
    """Append "(default: X)" to a flag's help, unless there is no default worth showing (None, off
    switches)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text
            and action.option_strings):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse with every default shown in --help and a one-line error instead of usage + error."""

    def __init__(self, **kw):
        super().__init__(formatter_class=_ShowDefaults, **kw)

    def error(self, message):
        sys.exit(f"error: {message} ({self.prog} --help lists the flags)")

    def parse_args(self, args=None, namespace=None):
        """argparse's, then one line for a value that is not UTF-8 text: the shell passes raw bytes
        (a Latin-1 file name, a pasted binary), which Python keeps as lone surrogates that the
        tokenizer, JSON readers and terminals later refuse with a traceback."""
        ns = super().parse_args(args, namespace)
        for action in self._actions:
            value = getattr(ns, action.dest, None)
            for v in value if isinstance(value, list) else [value]:
                bad = next((c for c in v if "\udc80" <= c <= "\udcff"), None) if isinstance(
                    v, str) else None
                if bad:
                    flag = action.option_strings[0] if action.option_strings else action.dest
                    sys.exit(f"error: {flag}: the value is not UTF-8 text (byte "
                             f"0x{ord(bad) - 0xdc00:02x} at character {v.index(bad) + 1}); pass "
                             f"UTF-8 text, or rename the file")
        return ns


def run(main, argv=None):
    """Call main(argv), ending a UserError with its one line (exit 1) and Ctrl-C with one line (exit
    130)."""
    try:
        return main(argv)
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C); nothing half-written was left behind", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # the reader of stdout has quit (`... | head`): end quietly with the status of a Unix tool
        # that SIGPIPE ended, 128 + 13, so that a script sees the tool did not finish (stdout goes
        # to /dev/null so that the interpreter's last flush does not fail again)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:
        # a file error no check caught (the disk filled up mid-run, ...): still one line
        from infra.files import describe_os_error
        where = f"{e.filename}: " if e.filename else ""
        sys.exit(f"error: {where}{describe_os_error(e)}")
    except RuntimeError as e:
        if peer_lost(e):
            rank = os.environ.get("RANK", "?")
            detail = " ".join(str(e).split())[-120:]
            sys.exit(f"error: rank {rank}: another rank of this torchrun job stopped (or stopped "
                     f"answering), so this one stops too ({detail}); files written before stay "
                     f"whole: see the first rank's error, then continue with --resume OUT")
        # torch.OutOfMemoryError on a GPU; the CPU allocator raises a plain RuntimeError
        if type(e).__name__ != "OutOfMemoryError" and "can't allocate memory" not in str(e):
            raise
        detail = " ".join(str(e).split())[:160]
        sys.exit(f"error: out of memory ({detail}); make the work smaller (fewer or shorter "
                 f"responses, a smaller --micro-batch-size or --eval-batch where the tool has "
                 f"them) or use a device with more memory; files written before stay whole, and a "
                 f"train.py run continues from its newest checkpoint with --resume")


# the messages of a collective whose peer process has died (gloo over TCP; NCCL)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "communicator was aborted", "NCCL error")


def peer_lost(e: BaseException) -> bool:
    """Whether a RuntimeError of a multi-rank job is a collective that lost its peer."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    return (type(e).__name__ == "DistBackendError"
            or any(m in str(e) for m in PEER_LOST))


# -----------------------------------------------------------------------------
# argument checks: each raises UserError naming the flag, the value and the allowed range

def explicit_flags(p: argparse.ArgumentParser, argv) -> set:
    """The destinations of the flags given on the command line (argparse fills only the missing
    ones)."""
    unset = object()
    ns = p.parse_args(argv, argparse.Namespace(**{a.dest: unset for a in p._actions}))
    return {k for k, v in vars(ns).items() if v is not unset}


def not_empty(args, *names):
    """A path flag given as "" (an unset shell variable, --out "$OUT") would silently mean the
    current folder."""
    for name in names:
        if getattr(args, name.lstrip("-").replace("-", "_"), None) == "":
            raise UserError(f"{name} '': an empty path (an unset shell variable?); pass a folder "
                            f"or file path")


def positive(args, *names):
    for name in names:
        v = getattr(args, name.lstrip("-").replace("-", "_"))
        if v is not None and v < 1:
            raise UserError(f"{name} {v}: must be at least 1")


def non_negative(args, *names):
    for name in names:
        v = getattr(args, name.lstrip("-").replace("-", "_"))
        if v is not None and v < 0:
            raise UserError(f"{name} {v}: must be 0 or more")


def finite(args, name, low=None, high=None, low_open=False, high_open=False, why=""):
    """A finite float within [low, high] (an end is excluded when *_open)."""
    v = getattr(args, name.lstrip("-").replace("-", "_"))
    bad_low = low is not None and (v <= low if low_open else v < low)
    bad_high = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(x for x in (lo, hi) if x)
        raise UserError(f"{name} {v}: must be a finite number {bounds}{why}")


def sampling(args, training: bool):
    """--temperature, --top-k, --top-p, --min-p (those the tool has)."""
    if training:
        finite(args, "--temperature", 0, low_open=True,
               why=" (it divides the training logits; 0 would give NaN losses)")
    else:
        finite(args, "--temperature", 0, why=" (0 = greedy)")
    if hasattr(args, "top_k"):
        non_negative(args, "--top-k")
        finite(args, "--top-p", 0, 1, low_open=True)
        finite(args, "--min-p", 0, 1)


def check_device(name: str) -> str:
    """The torch device `name` if this machine has it, else a one-line UserError."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r}: not a device name; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            cuda = torch.version.cuda
            build = "a CPU-only build" if cuda is None else f"CUDA {cuda}"
            raise UserError(f"--device {name}: torch {torch.__version__} ({build}) sees no CUDA "
                            f"GPU here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) "
                            f"here; use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UserError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: unsupported device type; use cpu or cuda")
    return name


def existing_file(path, flag: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file")
    return path


def fits_context(prompt_tokens: int, max_new_tokens: int, limit: int, what: str = "the prompt",
                 limit_name: str = "the model's context", raise_flag: str | None = None):
    """Refuse prompt + --max-new-tokens longer than `limit`: the sampler allocates the KV cache for
    the whole length before the first token (a typo such as 100000 would run out of memory after
    minutes of work), and past its context a model was never trained. raise_flag: a flag that set
    `limit` below the context, named in the advice."""
    if prompt_tokens + max_new_tokens > limit:
        room = limit - prompt_tokens
        fix = f"lower --max-new-tokens to at most {room}" if room >= 1 else "shorten the prompt"
        if raise_flag:
            fix += f", or raise {raise_flag}"
        raise UserError(f"{what} ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} "
                        f"exceed {limit_name} of {limit} tokens; {fix}")


# -----------------------------------------------------------------------------
# the model flags and loading

def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(p, dtype: bool = True):
    """The --model, --dtype and --device flags that every tool shares."""
    from infra import weights
    g = p.add_argument_group("model")
    g.add_argument("--model", default=str(weights.DEFAULT_MODEL_DIR),
                   help="HF-layout model folder (config.json + *.safetensors + tokenizer.json); "
                        "the default model is built on first use")
    if dtype:
        g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="weights dtype")
    g.add_argument("--device", default=default_device(), help="cpu, cuda or cuda:N")
    return g


def add_scale_args(p):
    """train.py's flags of speed and memory: they change how the work is cut, not what it
    computes (a resume may change them; infra/memory.py names them when a plan does not fit)."""
    g = p.add_argument_group("speed and memory")
    g.add_argument("--micro-batch-size", type=int, default=8,
                   help="responses per forward/backward pass (memory only)")
    g.add_argument("--rollout-batch", type=int, default=0,
                   help="responses sampled together, a multiple of --group-size (memory only: "
                   "the KV cache holds this many rows; 0 = all of the step's at once)")
    g.add_argument("--eval-batch", type=int, default=0, help="problems sampled together (memory "
                   "only: the KV cache grows with problems x samples; 0 = all at once)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute each block in the backward pass instead of keeping its "
                   "activations (memory only: the same gradients, about one more forward)")
    g.add_argument("--compile", action="store_true", help="sample with the compiled decode step "
                   "(torch.compile; slower than eager on a CPU, see docs/usage.md, 'Sampling')")
    g.add_argument("--parallel", default="dp", choices=["dp", "fsdp"], help="dp replicates the "
                   "model and optimizer on every torchrun rank; fsdp shards them (FSDP2, "
                   "infra/distributed.py), for models whose state does not fit one device (one "
                   "process too, with --cpu-offload)")
    g.add_argument("--cpu-offload", action="store_true", help="with --parallel fsdp: the fp32 "
                   "weights, gradients and AdamW state live in CPU memory, and the device holds "
                   "the blocks it computes (FSDP2's CPUOffloadPolicy; the optimizer step runs on "
                   "the CPU): a model whose state does not fit one GPU trains on one")
    g.add_argument("--ignore-memory-plan", action="store_true", help="start even when the memory "
                   "plan printed at the start exceeds the device (its estimates are upper bounds)")
    return g


def file_list(text: str | None) -> list[str]:
    """The files of a comma-separated flag (--eval-data "a.jsonl, b.jsonl"): blanks around
    the commas and empty entries are ignored."""
    return [f.strip() for f in (text or "").split(",") if f.strip()]


def template_kwargs(text: str) -> dict:
    """--chat-template-kwargs "enable_thinking=false,x=1": keyword arguments for the chat
    template, true / false / integers / decimals as such, anything else as text."""
    out = {}
    for item in (t for t in text.split(",") if t.strip()):
        key, eq, value = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise argparse.ArgumentTypeError(f"{item!r} is not name=value")
        v = value.strip()
        lower = v.lower()
        out[key.strip()] = (lower == "true" if lower in ("true", "false") else
                            int(v) if v.lstrip("-").isdigit() else
                            float(v) if v.replace(".", "", 1).lstrip("-").isdigit() else v)
    return out


def check_train(args):
    """Every argument of train.py, before anything is loaded or written."""
    not_empty(args, "--model", "--out", "--resume", "--analysis", "--data", "--eval-data",
              "--example")
    if args.eval_data is not None and not file_list(args.eval_data):
        raise UserError(f"--eval-data {args.eval_data!r}: names no file; pass comma-separated "
                        f".jsonl (or .parquet) files, or drop --eval-data")
    positive(args, "--steps", "--prompts-per-step", "--group-size", "--mini-batches",
             "--micro-batch-size", "--max-new-tokens", "--eval-problems", "--eval-samples",
             "--save-every", "--keep-checkpoints")
    non_negative(args, "--internal-steps", "--eval-every", "--seed", "--eval-batch",
                 "--rollout-batch")
    positive(args, "--max-prompt-tokens")
    if args.shots is None:   # a task's worked example; a data file has none (tasks.source)
        args.shots = 0 if args.data else 1
    if args.rollout_batch % args.group_size:
        raise UserError(f"--rollout-batch {args.rollout_batch}: must be a multiple of --group-size "
                        f"{args.group_size} (whole groups are sampled together), or 0")
    finite(args, "--lr", 0, low_open=True)
    if args.lr >= 1:   # AdamW steps each weight by about lr: 1e9 for 1e-9 explodes every weight
        raise UserError(f"--lr {args.lr:g}: a learning rate of 1 or more moves every weight by "
                        f"about that much per update (AdamW), and its weight decay scales them by "
                        f"1 - lr x decay; pass one below 1 (RL fine-tuning uses 1e-7 to 1e-4)")
    finite(args, "--weight-decay", 0)
    finite(args, "--grad-clip", 0, low_open=True)
    finite(args, "--clip-low", 0, 1, high_open=True)
    finite(args, "--clip-high", 0)
    finite(args, "--kl-coef", 0)
    sampling(args, training=True)
    if args.dual_clip != 0 and not (math.isfinite(args.dual_clip) and args.dual_clip > 1):
        raise UserError(f"--dual-clip {args.dual_clip}: must be 0 (off) or a finite number > 1")
    if args.prompts_per_step % args.mini_batches:
        raise UserError(f"--prompts-per-step {args.prompts_per_step} must be a multiple of "
                        f"--mini-batches {args.mini_batches}, so that every update sees whole "
                        f"groups")
    if args.internal_layer != "auto" and not args.internal_layer.isdigit():
        raise UserError(f"--internal-layer {args.internal_layer!r}: must be auto or a layer number "
                        f"(1-based)")
    if args.group_size == 1 and args.advantage != "grpo":
        raise UserError(f"--group-size 1 with --advantage {args.advantage}: every advantage would "
                        f"be 0; use G >= 2")
    if args.group_size == 1:
        print("warning: --group-size 1: no group baseline; the advantage is the raw reward (verl's "
              "convention for groups of one), so this is REINFORCE, not GRPO", file=sys.stderr)
    if args.algo == "bupo" and args.internal_steps >= args.steps:
        print(f"warning: --internal-steps {args.internal_steps} >= --steps {args.steps}: every "
              f"step is phase 1, so the layers above l and the final norm are never trained (the "
              f"paper: ~10% of steps)",
              file=sys.stderr)
    if args.kl_coef > 0 and args.old_logprobs == "sampler":
        raise UserError(f"--old-logprobs sampler with --kl-coef {args.kl_coef}: the reference's "
                        f"log-probs come from the old pass; use --old-logprobs auto or recompute")
    if args.cpu_offload and args.parallel != "fsdp":
        raise UserError("--cpu-offload keeps the sharded state of --parallel fsdp in CPU memory; "
                        "add --parallel fsdp")
    if args.analysis:
        existing_file(args.analysis, "--analysis")
    check_device(args.device)
    from infra.distributed import launcher_env
    launcher_env()   # a launcher's variables without the launcher: one line, not a hang


def stop_after_ctrl_c() -> list:
    """A list that the first Ctrl-C appends to: the loop finishes the step, saves and exits; a
    second aborts."""
    stop = []

    def on_interrupt(*_):
        stop.append(True)
        print("\nCtrl-C: stopping after this step and saving a checkpoint (again to abort)",
              file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, on_interrupt)
    return stop

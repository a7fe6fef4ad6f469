"""
The memory plan against what a run holds. train.py runs in this process under a dispatch mode that
counts the bytes of every live tensor storage (on a CPU every tensor is the device's), and each
phase's peak is written beside the plan's figure for it (infra/memory.py):

    python bench/memory_check.py --report plan.json [--largest 12] [train.py flags]
    torchrun --nproc-per-node 2 bench/memory_check.py --report plan.json --parallel fsdp [...]

The phases are the plan's: rollout (train.sample_step), update (the old pass and the updates;
"update, phase 1" while BuPO optimises pi^l) and evaluation (analyze.evaluate). A phase's peak
counts everything alive at the time, the weights and AdamW state included. It is the tensors'
bytes, without an allocator's rounding, caching or fragmentation, and without what a kernel
allocates inside itself. tests/test_memory_plan.py runs a grid of shapes through it: the plan must
be at least the measured peak of every phase, and at most 1.5x of it.
"""
import contextlib
import json
import os
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402
from infra import cli, memory  # noqa: E402
from infra.errors import UserError  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """The bytes of every live tensor storage made or touched by an op, and their peak.

    A storage is counted from the first op that makes or reads it until it is freed (a weak
    reference's callback). Storages resized outside any op (FSDP2 frees and refills its
    unsharded parameters that way) are re-measured whenever an op touches them, and all are
    re-measured every `resync` ops."""

    def __init__(self, resync: int = 256):
        super().__init__()
        self.size, self.now, self.peak, self.ops, self.resync = {}, 0, 0, 0, resync
        # --largest: what made each storage, and the largest ones at the latest peak
        self.storages, self.made, self.largest, self.at_peak = {}, {}, 0, []

    def track(self, tensors):
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            if is_traceable_wrapper_subclass(t):      # a DTensor: its local shard
                self.track(getattr(t, name) for name in t.__tensor_flatten__()[0])
                continue
            if t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, n = id(st), st.nbytes()
            if key not in self.size:
                self.storages[key] = weakref.ref(st)
                weakref.finalize(st, self.free, key)
                self.size[key] = 0
                if self.largest:
                    self.made[key] = f"{self.func} {tuple(t.shape)} {t.dtype}"
            self.now += n - self.size[key]
            self.size[key] = n

    def free(self, key):
        self.now -= self.size.pop(key, 0)
        self.storages.pop(key, None)
        self.made.pop(key, None)

    def measure(self):
        """Re-read every tracked storage's size (one resized outside any op)."""
        for key, ref in list(self.storages.items()):
            st = ref()
            if st is not None:
                self.now += st.nbytes() - self.size[key]
                self.size[key] = st.nbytes()
        return self.now

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.func = func
        self.track(tree_flatten((args, kwargs))[0])
        out = func(*args, **kwargs)
        self.track(tree_flatten(out)[0])
        self.ops += 1
        if self.ops % self.resync == 0:
            self.measure()
        if self.largest and self.now > 1.01 * self.peak:
            top = sorted(self.size, key=self.size.get, reverse=True)[:self.largest]
            # "?": made before counting began (the weights, read from their file)
            self.at_peak = [(round(self.size[k] / 2**20, 2), self.made.get(k, "?")) for k in top]
        self.peak = max(self.peak, self.now)
        return out


class Phases:
    """The peak of live bytes in each phase, over all the times it runs."""

    def __init__(self, counter: LiveBytes):
        self.counter, self.peaks, self.largest = counter, {}, {}

    @contextlib.contextmanager
    def phase(self, name, adopt=()):
        with torch.utils._python_dispatch._disable_current_modes():
            self.counter.track(adopt)            # weights and state made before counting began
            self.counter.peak = self.counter.measure()
        try:
            yield
        finally:
            with torch.utils._python_dispatch._disable_current_modes():
                peak = max(self.counter.peak, self.counter.measure())
            if peak > self.peaks.get(name, 0):
                self.peaks[name], self.largest[name] = peak, self.counter.at_peak

    def wrap(self, module, fn_name, name_of, adopt):
        fn = getattr(module, fn_name)

        def wrapped(*a, **k):
            with self.phase(name_of(*a, **k), adopt(*a, **k)):
                return fn(*a, **k)
        setattr(module, fn_name, wrapped)


def state_tensors(model, opt=None):
    """The model's parameters, buffers and gradients, and the optimizer's state."""
    out = [*model.parameters(), *model.buffers()]
    out += [p.grad for p in model.parameters() if p.grad is not None]
    if opt is not None:
        out += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return out


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__.strip())
        return
    if "--report" not in argv[:-1] or argv[argv.index("--report") + 1].startswith("-"):
        raise UserError("bench/memory_check.py: --report FILE is missing (where the plan and the "
                        "measured peaks go); e.g. python bench/memory_check.py --report plan.json "
                        "--steps 1 [train.py flags]")
    report = Path(argv[argv.index("--report") + 1])
    argv = [a for i, a in enumerate(argv) if a != "--report" and argv[i - 1:i] != ["--report"]]
    counter = LiveBytes()
    if "--largest" in argv:     # --largest N: the N largest storages at each phase's peak (MiB)
        counter.largest = int(argv[argv.index("--largest") + 1])
        argv = [a for i, a in enumerate(argv)
                if a != "--largest" and argv[i - 1:i] != ["--largest"]]
    phases = Phases(counter)
    plan, optimizers = {}, []
    check = memory.check

    def keep_plan(*a, **k):
        plan.update(check(*a, **k))
        return plan
    memory.check = keep_plan
    adam = torch.optim.AdamW

    class Counted(adam):                     # the run's optimizer, to count its state
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            optimizers.append(self)
    torch.optim.AdamW = Counted

    def adopt(model, *a, **k):
        return state_tensors(model, optimizers[0] if optimizers else None)

    def update_name(model, opt, batch, groups, old, ref_logp, adv, layer, *a, **k):
        return "update" if layer == model.config.num_layers else "update, phase 1"

    def old_name(model, ref, batch, groups, layer, *a, **k):
        return "old pass" if layer == model.config.num_layers else "old pass, phase 1"
    phases.wrap(train, "sample_step", lambda *a, **k: "rollout", adopt)
    phases.wrap(train, "old_pass", old_name, adopt)
    phases.wrap(train, "update", update_name, adopt)
    phases.wrap(train, "evaluate", lambda *a, **k: "evaluation", adopt)
    with counter:
        train.run_training(argv)
    rank = int(os.environ.get("RANK", 0))     # the process group is gone by now
    row = {"rank": rank, "plan": {k: sum(v.values()) for k, v in plan.items()},
           "measured": phases.peaks, **({"largest": phases.largest} if counter.largest else {})}
    path = report if rank == 0 else report.with_suffix(f".rank{rank}.json")
    path.write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])

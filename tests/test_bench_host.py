"""bench/host.py: what a benchmark says about its host, and when it warns."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import host  # noqa: E402


def watch(before, after, ticks0, ticks1, wall, monkeypatch, cores=2):
    monkeypatch.setattr(host.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(host.os, "sysconf", lambda name: 100)
    w = host.Watch()
    w.before, w.after, w.ticks0, w.ticks1, w.wall = before, after, ticks0, ticks1, wall
    return w


def test_a_quiet_run_has_no_warning(monkeypatch):
    # 10 s on 2 cores = 2000 ticks; the machine was busy 1900, this process 1850: 2.5% others
    w = watch(1.0e11, 1.1e11, (0, 0), (1900, 1850), 10.0, monkeypatch)
    assert abs(w.others() - 0.025) < 1e-9 and w.warnings() == []
    assert "other processes' share of the CPU during the run: 2.5%" in w.report()
    assert w.peak == 1.1e11


def test_a_drifting_matmul_rate_and_a_shared_cpu_are_warned(monkeypatch):
    w = watch(1.29e11, 1.80e11, (0, 0), (1900, 1000), 10.0, monkeypatch)
    warned = w.warnings()
    assert len(warned) == 2
    assert warned[0].startswith("warning: the host's matmul rate moved by 28% during the run "
                                "(0.129 -> 0.180 TFLOP/s)")
    assert warned[1].startswith("warning: other processes used 45% of the 2 cores' time")
    assert w.report().splitlines()[1:] == warned


def test_without_proc_the_share_is_unknown_and_not_warned(monkeypatch):
    w = watch(1e11, 1e11, None, None, 10.0, monkeypatch)
    assert w.others() is None and w.warnings() == []
    assert "unknown (no /proc)" in w.report()


def test_median_and_range():
    assert host.median_range([3.0, 1.0, 2.0, 10.0]) == "median 2.5 (1.0-10.0, n=4)"


def test_the_cpu_counters_are_read_here():
    ticks = host.cpu_ticks()
    if ticks is not None:          # Linux
        busy, mine = ticks
        assert busy >= 0 and mine >= 0


def test_the_rollout_and_training_benches_alternate_and_report_the_host(tiny_chat_model, tmp_path):
    """Both benches, end to end on a tiny model: each side's median and range over --repeat
    alternated runs, the host's matmul rates, and the provenance line of --out."""
    import importlib.util
    for name, args in (("bench_rollout", ["--prompts", "2", "--group-size", "2",
                                          "--new-tokens", "3", "--stop"]),
                       ("bench_train", ["--rows", "2", "--new-tokens", "3", "--layer", "1"])):
        path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = tmp_path / f"{name}.txt"
        module.main(["--model", str(tiny_chat_model), "--device", "cpu", "--repeat", "2",
                     "--out", str(out), *args])
        lines = out.read_text().splitlines()
        assert lines[0] == f"$ python bench/{name}.py " + " ".join(
            ["--model", str(tiny_chat_model), "--device", "cpu", "--repeat", "2", "--out",
             str(out), *args])
        assert lines[1].startswith("# commit ")
        timed = [x for x in lines if "median" in x]
        assert len(timed) == (2 if name == "bench_rollout" else 3)
        assert all("n=2)" in x for x in timed)
        assert any(x.startswith("host: ") and "TFLOP/s before and" in x for x in lines)

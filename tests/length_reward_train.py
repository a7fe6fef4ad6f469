"""train.py with a reward that a random model can earn (the parity of the response's length), for
the tests that run train.py in other processes: python tests/length_reward_train.py ARGS, or under
torchrun."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra import cli  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

tasks.reward = lambda text, answer: float(len(text) % 2)
cli.run(train.main, sys.argv[1:])

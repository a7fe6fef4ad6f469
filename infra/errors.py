"""
The error types, all of them. `UserError` is the one exception for expected bad input or a bad
environment: its message is one line, "what, where, what to do", and the command-line tools print it
as `error: <message>` and exit non-zero (infra/cli.py run). Anything else that escapes is a bug and
keeps its traceback.
"""
import json


class UserError(Exception):
    """Bad input or a bad environment (not a bug): the message is one line naming the problem and
    the fix."""


class ModelLoadError(UserError):
    """A checkpoint folder that cannot be used; the message is one line that names the file and the
    fix."""


class InputError(UserError):
    """Bad user input; the message is one line naming the file (and line) and the problem."""


def first_line(e: BaseException, limit: int | None = 120) -> str:
    """The first line of an exception's message, for a one-line error; its type's name when the
    message is empty (an EOFError of an empty file has none)."""
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def shown(value, limit: int = 40) -> str:
    """Any value as a short text for an error message: its JSON when it has one, else its type
    and repr (bytes, a decimal, ...); never raises."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = f"{type(value).__name__} {value!r}"
    return text[:limit]

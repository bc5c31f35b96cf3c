"""Error types. ``InputError`` is bad input: the CLI prints its one-line message and exits 2."""


class InputError(ValueError):
    """Bad user input (path, config, data, option); the message says what is wrong and how to fix it."""


class ModelOutputError(InputError):
    """The model returned NaN/inf, or an output of the wrong type, shape or dtype; lipscope refuses
    to use such outputs silently."""


def short_error(e: BaseException) -> str:
    """``Type: first line`` of an exception (just the type when it has no message): never a traceback."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300]}" if msg else type(e).__name__

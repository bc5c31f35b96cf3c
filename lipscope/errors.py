"""Error types. ``InputError`` is bad input: the CLI prints its one-line message and exits 2."""


class InputError(ValueError):
    """Bad user input (path, config, data, option); the message says what is wrong and how to fix it."""


class ModelOutputError(InputError):
    """The model returned NaN/inf, or an output of the wrong type, shape or dtype; lipscope refuses
    to use such outputs silently."""

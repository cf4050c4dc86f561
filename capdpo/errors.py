"""The kinds of user mistake capdpo reports. The CLI prints them as one line and exits with code 2."""


class CapdpoError(Exception):
    """Base class of every error that is the user's to fix (bad config, bad input)."""


class ConfigError(CapdpoError):
    """A config file, config field or command-line flag is wrong."""


class InputError(CapdpoError):
    """An input file (images, a previous stage's output, a model path) is missing or malformed."""


def one_line(err: BaseException) -> str:
    """An exception as one line, its type first (library messages can span several lines)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__

"""The one exception type users see: a single line naming the problem and the fix."""


class MedqError(Exception):
    """A problem with the user's input (config, data, model file) that medq reports as one line, not a traceback."""


class ConfigError(MedqError):
    """A config file or override is missing, malformed or holds a wrong value."""


class DataError(MedqError):
    """A dataset folder, file or label table is missing or unusable."""


def first_line(exc: BaseException) -> str:
    """An exception as one short line, for MedqError messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]

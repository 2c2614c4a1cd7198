"""The one exception type the export path raises for bad input; the CLI prints it as one line."""


class ExportError(Exception):
    """Bad input to edge-export: a missing or corrupt file, an unsupported model, a bad option."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message: what an error from a library says, in one line."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

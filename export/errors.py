"""The one exception type the export path raises for bad input; the CLI prints it as one line."""


class ExportError(Exception):
    """Bad input to edge-export: a missing or corrupt file, an unsupported model, a bad option."""

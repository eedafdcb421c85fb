"""One exception type for every user-facing failure: front ends print its message on one line and exit
non-zero (CLI) or answer 4xx/5xx (API), never a traceback."""


class DllamaError(Exception):
    """A problem the user can fix (bad input, missing file, unsupported model, unreachable worker)."""

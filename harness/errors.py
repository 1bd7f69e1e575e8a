"""The one exception a user can cause and fix (re-exported by :mod:`harness.api` and :mod:`harness`)."""


class HarnessError(Exception):
    """An error a user caused and can fix; the CLI prints its message as one line and exits 2."""

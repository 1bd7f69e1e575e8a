"""The one exception a user can cause and fix (re-exported by :mod:`harness.api` and :mod:`harness`)."""


class HarnessError(Exception):
    """An error a user caused and can fix; the CLI prints its message as one line and exits 2."""


class SetupRefusal(HarnessError):
    """Bad input that shows only once a task is set up (a data set its model source lacks): the
    runner then leaves nothing of the run behind, as if it had been refused before it started."""

"""For tests of read-only folders: root ignores file permissions, so a child process must give
up that power first."""
from __future__ import annotations

import os


def honour_permissions():
    """``preexec_fn`` for a child process: when running as root, drop CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH from its bounding set, so a read-only folder is read-only for it as for
    any user."""
    if os.geteuid() == 0:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

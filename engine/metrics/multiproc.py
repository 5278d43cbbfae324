"""PROMETHEUS_MULTIPROC_DIR for `nudge serve --workers N`.

prometheus_client picks its multiprocess mode from this variable when it is first
imported, so it must be set before the workers start (they are fresh processes
that inherit it), and the directory must start empty: files left by an earlier
run would add that run's counts to this one's.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare_multiproc_dir(data_dir: str) -> str | None:
    """Set PROMETHEUS_MULTIPROC_DIR to a fresh directory under `data_dir`; returns it.

    If the operator set the variable, their directory is used as it is (and None is
    returned: it is theirs to clean).
    """
    if os.environ.get(ENV):
        return None
    path = Path(data_dir) / "prometheus-multiproc"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    os.environ[ENV] = str(path)
    return str(path)


def remove_multiproc_dir(path: str) -> None:
    """Remove the directory `prepare_multiproc_dir` made."""
    shutil.rmtree(path, ignore_errors=True)
    if os.environ.get(ENV) == path:
        del os.environ[ENV]

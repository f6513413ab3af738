"""Preloaded into the multiprocessing fork server: import the parent's main script ONCE.

Every process the fork server starts re-runs the parent's ``__main__`` script
unless the server already imported it (``multiprocessing.spawn.prepare``
skips it then). ``set_forkserver_preload(["__main__"])`` is meant to do that,
but CPython 3.11/3.12 never pass the main path to the server (it looks for a
``main_path`` key that ``get_preparation_data`` names ``init_main_from_path``),
so each fleet worker re-imported the whole ``tenantctl`` CLI stack: ~2 s per
worker, which made ``--concurrency 8`` slower than ``--concurrency 1``.
:func:`control_plane.fleet.runner.mp_context` puts the path in
``TENANTCTL_FORKSERVER_MAIN`` before the server starts; this module imports it
the way ``spawn`` would, so forked workers inherit it for free.
"""

from __future__ import annotations

import os
from multiprocessing import spawn

MAIN_ENV = "TENANTCTL_FORKSERVER_MAIN"

_path = os.environ.get(MAIN_ENV)
if _path:
    spawn.import_main_path(_path)

"""Moved to `lorad_base.logs` (the base layer engines may import; docs/ARCHITECTURE.md). This name
stays for daemon/ code: it is the same module object, so state and monkeypatching are shared."""

import sys

from lorad_base import logs as _moved
from lorad_base.logs import *  # noqa: F403 (the names, for readers and the type checker)

sys.modules[__name__] = _moved

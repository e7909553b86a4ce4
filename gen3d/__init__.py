"""gen3d: a plugin-based 3D content generation framework.

Plugins implement the hooks in :mod:`gen3d.hookspecs` with the ``hookimpl`` marker, register
through the ``gen3d`` entry-point group, and use only what :mod:`gen3d.api` exports (all of it
is importable from here: ``from gen3d import hookimpl, Component, FieldTrainer``).
"""

__version__ = "0.1.0"

from .api import *  # noqa: E402,F401,F403  (the declared public API)
from .api import __all__ as _api  # noqa: E402

__all__ = ["__version__", *_api]

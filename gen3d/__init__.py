"""gen3d: a plugin-based 3D content generation framework.

Plugins implement the hooks in :mod:`gen3d.hookspecs` with the ``hookimpl`` marker
and register through the ``gen3d`` entry-point group.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("gen3d")

__all__ = ["__version__", "hookimpl"]

"""gen3d's first-party plugins. Each module registers through the ``gen3d`` entry-point group,
exactly as a third-party package would; the core never imports them by name."""

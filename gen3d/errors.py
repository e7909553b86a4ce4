"""Errors that gen3d reports to the user as one clear message (no traceback)."""


class Gen3DError(Exception):
    """Base class: the CLI prints the message and exits with status 2."""


class ConfigError(Gen3DError):
    """A recipe or command-line setting is wrong: names the file, key path and what was expected."""


class DataError(Gen3DError):
    """An input file (image, camera file, mesh) is missing or unreadable."""


class TrainingDiverged(Gen3DError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""

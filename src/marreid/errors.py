"""Errors a user can fix. The CLI prints them as one line naming the file or option."""


class MarreidError(Exception):
    """Base class: bad input from the user (a path, an option, a file)."""


class DatasetError(MarreidError):
    """A dataset root, layout, file name or image that cannot be used."""


class ConfigError(MarreidError):
    """An unknown key, a wrong type or an inconsistent value in the configuration."""


class CheckpointError(MarreidError):
    """A checkpoint or weight file that is missing, corrupt, untrusted or incompatible."""


class TrainingError(MarreidError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""

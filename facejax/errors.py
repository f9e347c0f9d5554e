"""User-facing errors: scripts print these as one clear line instead of a traceback."""


class FacejaxError(Exception):
    """A problem with the user's input (config, files, data, checkpoints) that they can fix."""


class ConfigError(FacejaxError):
    """A bad config file, key or value."""


class DataError(FacejaxError):
    """Missing, empty or unusable data."""


class CheckpointError(FacejaxError):
    """A missing or mismatched checkpoint, embedder or index."""


class WeightsError(FacejaxError):
    """Pretrained weights that cannot be found, read or merged."""


class TrainingError(FacejaxError):
    """Training diverged (a non-finite loss); the checkpoints saved before it are kept."""

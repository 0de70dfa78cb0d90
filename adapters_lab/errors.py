"""Errors that mean "your input or settings are wrong": shown as one clear line, not a traceback."""

from adapters_lab.adapters.base import AdapterConfigError
from adapters_lab.checks import ConfigKeyError, SettingError
from adapters_lab.config import TrainerConfigError
from adapters_lab.data.records import DataError
from adapters_lab.files import OutputDirError
from adapters_lab.training.checkpoints import CheckpointWriteError
from adapters_lab.training.loop import NonFiniteLossError

USER_ERRORS = (
    AdapterConfigError, ConfigKeyError, DataError, TrainerConfigError, OutputDirError, NonFiniteLossError,
    CheckpointWriteError, SettingError, FileNotFoundError, PermissionError,
)

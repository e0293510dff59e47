"""Errors that stop a stage with one readable line instead of a traceback."""


class LlmpipeError(Exception):
    """A problem the user can fix: bad params, bad data, an unreachable source."""


class ParamsError(LlmpipeError):
    """A value in params.yaml is unknown, of the wrong type or out of range."""


class DataError(LlmpipeError):
    """An input file or source is missing, corrupt or inconsistent."""


class DeviceError(LlmpipeError):
    """The hardware a run asks for cannot be used as installed (e.g. a GPU torch cannot reach)."""

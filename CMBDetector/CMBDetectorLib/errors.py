"""The one exception type the command line and the Slicer module turn into a readable message."""


class CMBError(Exception):
    """A problem the user can fix (bad input, missing file, wrong weights); the message says which."""


class InputError(CMBError):
    """The input is not something CMBDetector can read or treat as a brain GRE/SWI volume."""


class WeightsError(CMBError):
    """Model weights are missing, corrupt or do not match their recorded SHA-256."""

"""The one exception type for mistakes in what a user gave us (a file, a folder, an option).

Everything that catches it (the CLI, the napari reader) shows its message as one line and goes on;
anything else that escapes is a bug and keeps its traceback.
"""


class MammoInputError(ValueError):
    """Bad input from the user: the message says what is wrong and what to do."""

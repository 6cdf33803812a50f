"""User-facing errors.

Every problem with the user's input (a file, a node, an argument) is raised as ``SpcError``; the CLI prints its
one-line message and exits with code 2, and never writes an output file. Anything else is a bug in spc.
"""


class SpcError(Exception):
    """A problem with the user's input; the message is one line naming the file, node or argument."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

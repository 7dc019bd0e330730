"""The one exception type the user sees.

Every problem caused by the user's input (a file, a prompt, a model folder) is raised as a
`RadCLIPError` whose message is one line that says what is wrong and, where it helps, what to do.
The CLI, the training scripts and the Slicer module print that line, never a traceback.
"""


class RadCLIPError(Exception):
    """A clear, one-line, user-facing error."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

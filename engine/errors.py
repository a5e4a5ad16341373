"""The one exception type the CLI turns into a one-line message and exit code 2."""


class GlyphEngineError(Exception):
    """A problem with the user's input or environment, stated so they can fix it.

    The message is a full sentence that says what is wrong and how to fix it; the CLI
    prints it without a traceback.
    """

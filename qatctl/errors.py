"""The one error type stages raise for expected failures (bad input, bad usage)."""


class QatctlError(Exception):
    """An expected failure: the CLI prints `error: <message>` on one line and exits.

    exit_code 2 is bad usage or bad input (DESIGN §7); 1 is a run that failed.
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

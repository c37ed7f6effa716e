"""The exceptions the CLI reports on one line, without a traceback: FastganError, "the user asked for something
we cannot do" (exit 2), and TrainingStopped, a stop the user asked for (exit 128 + signal). Everything else is a
bug and keeps its traceback."""


class FastganError(Exception):
    pass


class TrainingStopped(Exception):
    """A stop asked for by SIGINT/SIGTERM, after its checkpoint was written: not an error, but the run did not
    finish, so the command exits with 128 + the signal's number, as a shell expects of a signalled program."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum

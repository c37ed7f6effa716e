"""The one exception type that means "the user asked for something we cannot do": the CLI prints its message
on one line and exits 2, without a traceback. Everything else is a bug and keeps its traceback."""


class FastganError(Exception):
    pass

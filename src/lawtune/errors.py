"""lawtune's own error types. A ``UsageError`` is something the user did (a bad config key, a malformed data line,
an unusable model directory): the command line prints its one-line message and exits 2. Anything else is a bug and
keeps its traceback."""


class UsageError(Exception):
    """What a user did wrong; the message names the file and line, or the config key."""

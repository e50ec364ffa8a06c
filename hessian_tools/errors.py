"""The one exception type the command line turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or a failed check the user can act on; the message names the problem and the fix."""

"""The one base class for errors meant for the user, not for a traceback.

Every stage raises a subclass (ConfigError, ManifestError, CurationError, ...) whose message names
the cause and the fix; the CLI prints it on one line and exits with status 2.
"""


class SigscaleError(Exception):
    """An input or environment problem the user can fix; the message says how."""

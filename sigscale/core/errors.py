"""The one base class for errors meant for the user, not for a traceback, and how a job shows one.

Every stage raises a subclass (ConfigError, ManifestError, CurationError, ...) whose message names
the cause and the fix; the CLI prints it on one line and exits with status 2.
"""
import json
import os
import sys
import time

USER_ERROR_EXIT = 2
# Set by sigscale's torchrun launcher (sigscale.core.torchrun) for the ranks it starts: it prints their line.
LAUNCHER_ENV = "SIGSCALE_LAUNCHER"
# torchrun gives each worker a file for its failure; sigscale's launcher reads the user error's line there.
TORCHRUN_ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"
USER_ERROR_FIELD = "sigscale_user_error"  # marks an error file whose message is a user error's line


class SigscaleError(Exception):
    """An input or environment problem the user can fix; the message says how."""


def report_user_error(line: str) -> None:
    """Show a user error once per job: rank 0 prints it, or sigscale's launcher does from torchrun's error file.

    Every rank of a job hits the same user error (they agree on it), so printing it on each would repeat
    the line once per rank. Under torchrun each rank also records it in its error file, so that the
    launcher can show the line of whichever rank failed first even when the others were stopped mid-way.
    """
    error_file = os.environ.get(TORCHRUN_ERROR_FILE_ENV)
    if error_file:
        # The format torchrun's ProcessFailure reads (message + timestamp), written whole: the agent may stop
        # this rank at any instant once another rank has exited, and it cannot parse half a file.
        tmp = f"{error_file}.tmp"
        with open(tmp, "w") as f:
            json.dump({"message": line, "timestamp": int(time.time()), USER_ERROR_FIELD: True}, f)
        os.replace(tmp, error_file)
        if os.environ.get(LAUNCHER_ENV):
            return
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr)

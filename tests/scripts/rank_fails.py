"""A rank program for the launcher tests: rank 1 fails as asked, rank 0 waits until the launcher stops it."""
import os
import sys
import time

from sigscale.core.errors import USER_ERROR_EXIT, report_user_error

if os.environ["RANK"] == "1":
    if sys.argv[1] == "user-error":
        report_user_error("sigscale: error: rank 1 was given nothing to train on; point data.shards at real shards")
        sys.exit(USER_ERROR_EXIT)
    raise RuntimeError("a bug, not a user error")
time.sleep(120)

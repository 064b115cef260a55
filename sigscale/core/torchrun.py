"""``python -m sigscale.core.torchrun ARGS``: torchrun (same arguments) that ends a user error with one line, rc 2.

A rank that stops on a user error exits 2 after writing its one-line message to the error file torchrun
gives each worker (``sigscale.core.errors.report_user_error``). torchrun would print its ChildFailedError
traceback and exit 1; this launcher prints the first recorded user error's line instead and exits 2, so
that ``sigscale train --nproc N`` fails like ``sigscale train``. Any other failure ends as torchrun's does
(its ChildFailedError table and traceback, exit 1).
"""
from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from sigscale.core.errors import LAUNCHER_ENV, USER_ERROR_EXIT, USER_ERROR_FIELD

# The logger of torch's worker processes; on a failure it names the first failed worker and each worker it stops.
AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


def _not_about_the_failure(record: logging.LogRecord) -> bool:
    """Drop the agent's lines about the failed worker and the ones it stops: main() reports the failure."""
    return not str(record.msg).startswith(("Sending process", "failed (exitcode"))


def main(argv: Optional[List[str]] = None) -> int:
    """Run torchrun with ``argv``; a rank's user error ends it with that one line and exit status 2."""
    os.environ[LAUNCHER_ENV] = "1"  # the ranks inherit it: they leave printing their user error to this process
    logging.getLogger(AGENT_LOGGER).addFilter(_not_about_the_failure)
    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
    except ChildFailedError as e:
        # Ranks that hit the user error after the first one may have been stopped by the agent mid-exit
        # (SIGTERM): the first *recorded* user error is the cause, whatever signal ended the others.
        recorded = sorted((f for f in e.failures.values() if f.error_file_data.get(USER_ERROR_FIELD)),
                          key=lambda f: f.timestamp)
        if recorded:
            print(recorded[0].message, file=sys.stderr)
            return USER_ERROR_EXIT
        if e.get_first_failure()[1].exitcode == USER_ERROR_EXIT:  # argparse's usage error: each rank printed it
            return USER_ERROR_EXIT
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

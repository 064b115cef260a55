"""``python -m sigscale.core.torchrun ARGS``: torchrun (same arguments) that ends a user error with one line, rc 2.

A rank that stops on a user error exits 2 after writing its one-line message to the error file torchrun
gives each worker (``sigscale.core.errors.report_user_error``). torchrun would print its ChildFailedError
traceback and exit 1; this launcher prints the first failed rank's line instead and exits 2, so that
``sigscale train --nproc N`` fails like ``sigscale train``. Any other failure is reported as torchrun does.
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


def _not_about_a_user_error(record: logging.LogRecord) -> bool:
    """Drop the agent's lines about stopping workers and about a worker that exited with a user error."""
    if record.msg.startswith("Sending process"):
        return False
    return not (record.msg.startswith("failed (exitcode") and record.args and record.args[0] == USER_ERROR_EXIT)


def main(argv: Optional[List[str]] = None) -> int:
    """Run torchrun with ``argv``; the exit status is 2 with one line when the first failed rank had a user error."""
    os.environ[LAUNCHER_ENV] = "1"  # the ranks inherit it: they leave printing their user error to this process
    logging.getLogger(AGENT_LOGGER).addFilter(_not_about_a_user_error)
    try:
        run(parse_args(argv if argv is not None else sys.argv[1:]))
    except ChildFailedError as e:
        _, first = e.get_first_failure()
        if first.exitcode != USER_ERROR_EXIT:
            raise
        if first.error_file_data.get(USER_ERROR_FIELD):  # else the rank printed its own (argparse's usage)
            print(first.message, file=sys.stderr)
        return USER_ERROR_EXIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

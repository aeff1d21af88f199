"""`accelerate launch` for `merge --num-processes N`, without the launcher's traceback on failure.

When a merge process stops on a user error it has printed the message already (once, from the
main process) and exits 2; torchrun then raises `ChildFailedError`, and `accelerate launch` shows
it as a traceback with a failure table. Here the launch runs the same way, and a failed process
becomes this process's exit code with one line at most.

    python -m hf_metagpt._launch [accelerate launch options] -m hf_metagpt merge ...
"""

from __future__ import annotations

import logging
import sys

#: exit code of a process that stopped on a `MergeError` (cli.main) and has said why
USER_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(sys.argv[1:] if argv is None else argv)
    # The elastic agent logs every failed process at ERROR ("failed (exitcode: 2) local_rank: 0 ...");
    # a user error has been printed by the process itself, so only critical agent logs show.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode if isinstance(failure.exitcode, int) and failure.exitcode > 0 else 1
        if code != USER_ERROR:  # a crash, a signal: the process may have said nothing
            print(f"error: merge process {rank} failed (exit code {failure.exitcode}); "
                  "rerun with --debug to see its traceback.", file=sys.stderr)
        return code
    except (KeyboardInterrupt, SignalException):  # Ctrl-C: torchrun has stopped the processes
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m warmpool``: the ``warmpool`` command, under a main guard (``warmpool
export`` starts an engine that spawns processes, which re-import the main module)."""

from warmpool.cli import main

if __name__ == "__main__":
    main()

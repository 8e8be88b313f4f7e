"""``python -m sopkit``: the command line, as the ``sopkit`` script runs it (what
``torchrun --nproc-per-node N -m sopkit compare ...`` starts in every process)."""

from sopkit.cli import main

if __name__ == "__main__":
    main()

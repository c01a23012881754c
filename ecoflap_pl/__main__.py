"""``python -m ecoflap_pl ARGS``: the ``ecoflap`` command (``torchrun -m ecoflap_pl ARGS`` starts it once per rank)."""

from ecoflap_pl.entry_point import main

if __name__ == "__main__":
    main()

"""``python -m stbp.export CHECKPOINT OUT.nir``: the command of :mod:`stbp.train.export`, at a short name."""

from .train.export import main

if __name__ == "__main__":
    raise SystemExit(main())

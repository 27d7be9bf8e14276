"""``python -m stbp.evaluate CHECKPOINT``: the command of :mod:`stbp.train.evaluate`, kept at its short name."""

from .train.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())

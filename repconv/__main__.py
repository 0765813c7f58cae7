"""``python -m repconv``: the same as the ``repconv`` console script."""

from repconv.cli.entry import run

if __name__ == "__main__":
    run()

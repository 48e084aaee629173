"""``python -m evaclip COMMAND ...``: the same as the ``evaclip`` console script (when .venv/bin is not on PATH)."""
from evaclip.cli import run

if __name__ == "__main__":
    run()

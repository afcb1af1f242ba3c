"""``python -m tunestack`` (what ``torchrun`` and ``accelerate launch -m tunestack`` start)."""

from tunestack.cli import main

if __name__ == "__main__":
    main()

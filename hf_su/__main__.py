"""``python -m hf_su`` is the ``hf-su`` command (also what ``accelerate launch -m hf_su`` runs)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())

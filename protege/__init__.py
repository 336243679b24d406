"""protege: distil an expensive model's narrow task into a small, fast student, with numbers to prove it."""

__version__ = "0.1.0"

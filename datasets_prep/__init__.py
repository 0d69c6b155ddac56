"""Built-in dataset reorganizers. Importing this package registers them."""

from datasets_prep import brats2021  # noqa: F401

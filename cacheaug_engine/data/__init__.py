"""Text and tokens: tokenizers (``text``), corpora, held-out splits and the sequence loader
(``corpus``), and synthetic tasks whose answers must be computed from the prompt (``tasks``)."""

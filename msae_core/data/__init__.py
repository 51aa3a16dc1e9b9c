"""The data layer: language models (`lm`), text corpora (`text`), the activation store (`store`, the
one owner of its on-disk format) and `msae harvest` (`harvest`). Imports only the SAE math below it."""

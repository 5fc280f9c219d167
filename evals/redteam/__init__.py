"""Red-teaming with outside corpora: corpora.py (the attack corpora and the benign set,
split by hash), training.py (what the rails' classifiers learn from: development data
only), run.py (a run against a live server and its report)."""

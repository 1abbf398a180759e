"""sipstream: self-improving pretraining (arXiv 2601.21343) as a streaming online-learning engine on Kafka."""

__version__ = "0.1.0"

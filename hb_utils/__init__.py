"""HealthBot experiment kit: config, data, model, training, evaluation and reports for the notebooks."""

__version__ = "0.1.0"

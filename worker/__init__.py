"""Everything that touches tensors: training, unlearning, audits, and the Celery tasks."""

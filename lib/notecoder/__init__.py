"""notecoder: batch ICD-10 coding of clinical-note archives with a fine-tuned LLM."""

__version__ = "0.1.0"

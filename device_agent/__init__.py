"""device_agent: 12-lead ECG capture from a serial acquisition board, delivered to S3."""

__version__ = "0.1.0"

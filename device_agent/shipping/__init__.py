"""Getting packages, dropped reports and signups into S3 exactly once: the outbox, the drain,
the uploader and its transport.
"""

"""The thin core every stage stands on: the record, settings, errors, files, S3 keys, the clock
and the text gate.
"""

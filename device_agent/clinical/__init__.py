"""What a 12-lead cart measures: beats, wave boundaries, intervals and axes."""

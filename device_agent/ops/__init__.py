"""Keeping the unit running: status, doctor, disk reserve, systemd notify and the capture spool."""

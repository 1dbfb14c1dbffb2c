"""The board link: the serial port and the 22-byte frames it carries."""

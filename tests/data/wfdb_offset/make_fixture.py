"""Rebuild L00001 (the `16x1+24` fixture) from LUDB record 1: `python make_fixture.py`.

L00001.mat is a MATLAB v4 file, as the PhysioNet/CinC Challenge 2021 distributes PTB-XL
(and the other databases): a 24-byte prologue (the v4 matrix header, 20 bytes: type 30 =
little-endian int16, 12 rows, 5000 columns, real, name length 4; then the name "val\\0")
followed by the 12 x 5000 int16 matrix in column order, which is WFDB format 16 with
every frame's 12 samples together. The samples are tests/data/ludb/1.dat's, byte for byte;
the header is tests/data/ludb/1.hea's with the file named L00001.mat and the format field
written `16x1+24` (one sample per frame, 24 bytes before the first sample).
"""

from __future__ import annotations

import struct
from pathlib import Path

HERE = Path(__file__).resolve().parent
LUDB = HERE.parent / "ludb"


def main() -> None:
    samples = (LUDB / "1.dat").read_bytes()
    rows, cols = 12, len(samples) // 24
    prologue = struct.pack("<5i", 30, rows, cols, 0, 4) + b"val\x00"
    assert len(prologue) == 24
    (HERE / "L00001.mat").write_bytes(prologue + samples)
    lines = (LUDB / "1.hea").read_text().splitlines()
    out = [lines[0].replace("1 ", "L00001 ", 1)]
    for line in lines[1:13]:
        fields = line.split()
        fields[0], fields[1] = "L00001.mat", "16x1+24"
        out.append(" ".join(fields))
    out.append("# LUDB record 1 (ODC-By 1.0) in the PhysioNet/CinC 2021 layout: see README.md")
    (HERE / "L00001.hea").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()

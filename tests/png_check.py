#!/usr/bin/env python3
"""tests/png_check.py PNG... -- is each screenshot a picture? (tests/render_check.sh calls it)

Fails (exit 1) on a blank image (every pixel the same colour) and on an image showing Chromium's
XML error box (its pink #fdd background over more than a few hundred pixels). Prints one line
per file: size, distinct colours, error-box pixels.

Python's standard library only. A PNG is a signature and chunks (length, type, data, CRC); the
IDAT chunks together are one zlib stream, which inflates to the rows, each a filter byte (0 none,
1 sub, 2 up, 3 average, 4 Paeth) then the row's bytes as differences the filter undoes.
"""
import struct
import sys
import zlib

ERROR_BOX = (255, 221, 221)   # Chromium's parsererror background, #fdd
CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}   # grey, RGB, grey + alpha, RGBA


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def unfilter(kind, line, prev, bpp):
    """undo one row's filter in place: line[x] += predictor(left, up, upper left)"""
    n = len(line)
    if kind == 1:
        for x in range(bpp, n):
            line[x] = (line[x] + line[x - bpp]) & 255
    elif kind == 2:
        for x in range(n):
            line[x] = (line[x] + prev[x]) & 255
    elif kind == 3:
        for x in range(n):
            left = line[x - bpp] if x >= bpp else 0
            line[x] = (line[x] + ((left + prev[x]) >> 1)) & 255
    elif kind == 4:
        for x in range(n):
            left = line[x - bpp] if x >= bpp else 0
            upleft = prev[x - bpp] if x >= bpp else 0
            line[x] = (line[x] + paeth(left, prev[x], upleft)) & 255
    elif kind != 0:
        raise ValueError("unknown filter type %d" % kind)


def read_png(path):
    """(width, height, bytes per pixel, rows of raw pixel bytes) of an 8-bit, non-interlaced PNG"""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    i, idat, ihdr = 8, [], None
    while i + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + n]
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        i += 12 + n
    if ihdr is None:
        raise ValueError("no IHDR chunk")
    w, h, depth, ctype, _, _, interlace = ihdr
    if depth != 8 or ctype not in CHANNELS or interlace:
        raise ValueError("only 8-bit non-interlaced grey/RGB(A) PNGs are read (depth %d, colour type %d)" % (depth, ctype))
    bpp = CHANNELS[ctype]
    raw = zlib.decompress(b"".join(idat))
    stride = w * bpp
    if len(raw) != h * (stride + 1):
        raise ValueError("image data is %d bytes, expected %d" % (len(raw), h * (stride + 1)))
    rows, prev = [], bytearray(stride)
    for y in range(h):
        at = y * (stride + 1)
        line = bytearray(raw[at + 1:at + 1 + stride])
        unfilter(raw[at], line, prev, bpp)
        rows.append(bytes(line))
        prev = line
    return w, h, bpp, rows


def check(path):
    w, h, bpp, rows = read_png(path)
    colours, pink = set(), 0
    box = bytes(ERROR_BOX[:bpp]) if bpp >= 3 else None
    for row in rows:
        px = [row[x:x + bpp] for x in range(0, len(row), bpp)]
        colours.update(px)
        if box:
            pink += sum(1 for p in px if p[:3] == box)
    problems = []
    if len(colours) < 2:
        problems.append("blank: one colour")
    if pink > 300:
        problems.append("shows Chromium's XML error box (%d pink pixels)" % pink)
    print("  %-60s %dx%d, %d colours, %d error-box pixels%s" % (path, w, h, len(colours), pink,
          ": " + "; ".join(problems) if problems else ""))
    return not problems


if __name__ == "__main__":
    ok = True
    for p in sys.argv[1:]:
        try:
            ok &= check(p)
        except (OSError, ValueError, zlib.error) as e:
            print("  %s: %s" % (p, e))
            ok = False
    sys.exit(0 if ok else 1)

# Deterministic payload: `awk -v seed=N -v bytes=B -f gen.awk` prints about B bytes of hex text
# (65-byte lines) from the MINSTD generator seeded with N. Every product stays below 2^53, so the
# arithmetic is exact in awk's doubles and the bytes are the same on every machine.
BEGIN {
    s = (seed % 2147483646) + 1
    lines = int((bytes + 64) / 65)
    for (i = 0; i < lines; i++) {
        line = ""
        for (j = 0; j < 8; j++) {
            s = (s * 48271) % 2147483647
            line = line sprintf("%08x", s)
        }
        print line
    }
}

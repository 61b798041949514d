#!/usr/bin/env python3
"""Authoring helper for filetests: turns `asm: <intel instruction>` lines into
`code: <hex bytes> ; <instruction>` lines using GNU as (intel syntax).

Labels: `asm: L1:` defines a label (kept as a comment), `asm: jz L1` jumps to it.
Usage: python3 assemble.py FILE.fold...   (rewrites files in place; idempotent)
The runner only reads `code:` lines; expected values are NOT produced here."""
import os, re, subprocess, sys, tempfile

def assemble(lines):
    src = [".intel_syntax noprefix", ".text"]
    for i, l in enumerate(lines):
        src.append(f"line_{i}:")
        src.append(l)
    src.append(f"line_{len(lines)}:")
    with tempfile.TemporaryDirectory() as d:
        s, o, b = (os.path.join(d, n) for n in ("a.s", "a.o", "a.bin"))
        open(s, "w").write("\n".join(src) + "\n")
        subprocess.run(["as", "--64", "-o", o, s], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", o, b], check=True)
        data = open(b, "rb").read() if os.path.exists(b) else b""
        syms = {}
        for l in subprocess.run(["nm", o], check=True, capture_output=True, text=True).stdout.splitlines():
            p = l.split()
            if len(p) == 3 and p[2].startswith("line_"):
                syms[int(p[2][5:])] = int(p[0], 16)
        rel = subprocess.run(["objdump", "-r", o], capture_output=True, text=True).stdout
        if "R_X86_64" in rel:
            sys.exit(f"relocations in {lines}: use labels, not absolute branch targets")
    return [data[syms[i]:syms[i + 1]] for i in range(len(lines))]

for path in sys.argv[1:]:
    text = open(path).read().splitlines()
    idx = [i for i, l in enumerate(text) if l.startswith("asm:")]
    if not idx:
        continue
    asm = [text[i][4:].split(";;")[0].strip() for i in idx]
    codes = assemble(asm)
    for i, a, c in zip(idx, asm, codes):
        if a.endswith(":"):
            text[i] = f"; {a}"
        else:
            text[i] = f"code: {' '.join(f'{x:02x}' for x in c):<30} ; {a}"
    open(path, "w").write("\n".join(text) + "\n")

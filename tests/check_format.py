#!/usr/bin/env python3
"""Check a checkpoint against a reference file with the PyPI `safetensors` reader.

    python3 tests/check_format.py CKPT REF        (needs `safetensors` and `numpy`, not torch)

1. CKPT's __metadata__ holds vocab_size, d_model, n_layers, n_heads, ffn_hidden.
2. Every backbone parameter (names from n_layers) is in CKPT, float32, with the shape the metadata implies.
3. Every tensor of REF whose name is also in CKPT is bitwise equal there.
4. The hand-written reader of tests/reference.py reads CKPT and REF exactly as `safetensors` does.
One line per check; exit status 1 on any mismatch, 0 otherwise.
"""
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference  # noqa: E402  (its torch import is optional)

REQUIRED = ["vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden"]
failures = 0


def report(ok, what):
    global failures
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}")


def load(path):
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def expected_shapes(meta):
    V, C, L, F = (int(meta[k]) for k in ["vocab_size", "d_model", "n_layers", "ffn_hidden"])
    shapes = {"tok_emb": (V, C), "final_norm": (C,)}
    for i in range(L):
        for b in reference.BLOCK:
            shapes[f"layers.{i}.{b}"] = {"w1": (F, C), "w3": (F, C), "w2": (C, F)}.get(
                b, (C,) if b.endswith("norm") else (C, C))
    return shapes


def check_reader(path, meta, tensors):
    """The stdlib reader agrees with safetensors: same metadata, names, shapes and bytes."""
    meta2, raw = reference.read_safetensors(path)
    bad = [n for n in tensors if n not in raw or tuple(raw[n][0]) != tensors[n].shape
           or raw[n][1].tobytes() != tensors[n].astype("<f4").tobytes()]
    report(meta2 == meta and raw.keys() == tensors.keys() and not bad,
           f"hand-written reader matches safetensors on {path} ({len(tensors)} tensors)"
           + (f"; differs: {bad[:5]}" if bad else ""))


def main():
    if len(sys.argv) != 3:
        print(__doc__.strip().split("\n")[2])
        return 2
    ckpt, ref = sys.argv[1], sys.argv[2]
    meta, cw = load(ckpt)
    rmeta, rw = load(ref)
    missing = [k for k in REQUIRED if k not in meta]
    report(not missing, f"{ckpt} metadata has {', '.join(REQUIRED)}"
           + (f"; missing {missing}" if missing else ""))
    if not set(missing) - {"n_heads"}:   # the shapes need every key but n_heads
        for name, shape in expected_shapes(meta).items():
            t = cw.get(name)
            ok = t is not None and t.dtype == np.float32 and t.shape == shape
            report(ok, f"{name} present, float32, shape {list(shape)}"
                   + ("" if ok else " (absent)" if t is None else f" (got {t.dtype} {list(t.shape)})"))
    common = sorted(set(cw) & set(rw))
    print(f"note {len(common)} tensor names shared by {ckpt} and {ref}")
    for name in common:
        a, b = cw[name], rw[name]
        if not same(a, b):
            diff = (f"max abs diff {np.abs(a.astype(np.float64) - b).max():.3e}" if a.shape == b.shape
                    else f"shape {list(a.shape)} vs {list(b.shape)}")
            report(False, f"{name} differs from the reference ({diff})")
    if common:
        report(all(same(cw[n], rw[n]) for n in common), f"all {len(common)} shared tensors bitwise equal")
    check_reader(ckpt, meta, cw)
    check_reader(ref, rmeta, rw)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

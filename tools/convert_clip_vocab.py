"""Convert open_clip's CLIP BPE vocabulary into Hugging Face `vocab.json` + `merges.txt`.

Run once; the output is committed under RadCLIPCore/resources/tokenizer/ so the package works
air-gapped. Source: `open_clip/bpe_simple_vocab_16e6.txt.gz` in the open-clip-torch wheel
(MIT licence, vocabulary by OpenAI). Usage:

    pip download --no-deps open-clip-torch -d /tmp/oc
    unzip -o /tmp/oc/open_clip_torch-*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python tools/convert_clip_vocab.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz RadCLIPCore/resources/tokenizer

The token order is OpenAI's: 256 byte symbols, the same with the end-of-word marker `</w>`,
48,894 merges, then `<|startoftext|>` and `<|endoftext|>` — 49,408 tokens.
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode():
    """OpenAI's reversible byte -> printable unicode table (GPT-2 / CLIP BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def main(src, out_dir):
    lines = gzip.open(src, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {len(tokens)} tokens and {len(merges)} merges to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:3])

"""CLIP tokenizer files (vocab.json, merges.txt) built from OpenAI's BPE vocabulary.

Stable Diffusion's `CLIPTokenizer` is CLIP's byte-level BPE. Its vocabulary ships as
`bpe_simple_vocab_16e6.txt.gz` (in the `open-clip-torch` wheel, MIT licence). No machine here
reaches the model hubs, so we rebuild the tokenizer files from that vocabulary, the same way
CLIP's own `SimpleTokenizer` builds its encoder: 256 byte symbols, the same with the
end-of-word marker `</w>`, then one token per merge, then the two special tokens.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# CLIP keeps the first 49152 - 256 - 2 merges of the file (its first line is a header).
NUM_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # SD's tokenizer config; padding to max length needs it set


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2 / CLIP byte-level BPE)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codepoints)))


def clip_vocab_and_merges(bpe_gz_path: str | Path) -> tuple[dict[str, int], list[str]]:
    """Return (token -> id, merge lines) from `bpe_simple_vocab_16e6.txt.gz`."""
    lines = gzip.open(bpe_gz_path).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(bpe_gz_path: str | Path, out_dir: str | Path) -> Path:
    """Write a `CLIPTokenizer` folder (vocab.json, merges.txt, configs) loadable by from_pretrained."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(bpe_gz_path)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir

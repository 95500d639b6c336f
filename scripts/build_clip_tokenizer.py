"""Build models/clip-tokenizer/ from the BPE vocabulary in the open-clip-torch wheel.

Run once (the result is committed):
    pip download --no-deps -d /tmp/oc open-clip-torch
    python scripts/build_clip_tokenizer.py /tmp/oc/open_clip_torch-*.whl models/clip-tokenizer
open_clip itself is never imported (it needs torchvision); we only read one file from the wheel.
"""

import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

from ec_lora_t.demo.clip_tokenizer import write_clip_tokenizer

VOCAB_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"


def main(wheel: str, out_dir: str) -> None:
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as tmp:
        vocab_path = archive.extract(VOCAB_MEMBER, tmp)
        licence = next(n for n in archive.namelist() if n.endswith("LICENSE"))
        licence_text = archive.read(licence).decode()
        write_clip_tokenizer(vocab_path, out_dir)
    notice = (
        "vocab.json and merges.txt are derived from bpe_simple_vocab_16e6.txt.gz (OpenAI CLIP's BPE\n"
        f"vocabulary) as shipped in {Path(wheel).name}, under the following licence:\n\n"
    )
    (Path(out_dir) / "LICENSE").write_text(notice + licence_text)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])

"""Write serving/data/imagenet_classes.txt: the 1000 ImageNet class names, one per line, in class order.

Keras would download its class index at the first decode_predictions call; we ship the names
instead so the server works offline. They come from the synset lists that timm's wheel carries
(timm/data/_info), named the way Keras names them: the first lemma, spaces as underscores
("beagle", "golden_retriever", "great_white_shark").

    pip download --no-deps timm -d /tmp/timm && unzip -o /tmp/timm/timm-*.whl 'timm/data/_info/*' -d /tmp/timm
    python scripts/make_imagenet_labels.py /tmp/timm/timm/data/_info
"""

import pathlib
import sys

OUT = pathlib.Path(__file__).resolve().parent.parent / "serving" / "data" / "imagenet_classes.txt"


def main(info_dir: pathlib.Path) -> None:
    synsets = (info_dir / "imagenet_synsets.txt").read_text().split()
    lemmas = dict(line.split("\t", 1) for line in (info_dir / "imagenet_synset_to_lemma.txt").read_text().splitlines())
    names = [lemmas[s].split(",")[0].strip().replace(" ", "_") for s in synsets]
    assert len(names) == 1000, len(names)
    OUT.write_text("\n".join(names) + "\n")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]))

"""``ave``: the Audio-Visual Event dataset (28 events), read as Kinetics-Sounds with AVE's own lists.

Layout under the root::

    trainSet.txt, valSet.txt, testSet.txt   AVE annotation lines "Category&VideoID&Quality&Start&End"
    audio/<VideoID>.wav  or  audio/<VideoID>.npy
    visual/<VideoID>/*.jpg                  frames extracted at 1 fps

The recipe is that of ``kinetics-sounds`` (kaldi fbank 128 × 1024, 3 evenly spaced frames). A
header line (``Category&VideoID&...``, as in ``Annotations.txt``) is skipped. Without
``valSet.txt`` the validation split is carved from train.
"""

from __future__ import annotations

from pathlib import Path

from benchmark.data.kinetics_sounds import AudioVisualClips
from benchmark.data.ondisk import Item
from benchmark.errors import UsageError
from benchmark.registry import register_dataset

CLASSES = [
    "Church bell", "Male speech, man speaking", "Bark", "Fixed-wing aircraft, airplane",
    "Race car, auto racing", "Female speech, woman speaking", "Helicopter", "Violin, fiddle", "Flute",
    "Ukulele", "Frying (food)", "Truck", "Shofar", "Motorcycle", "Acoustic guitar", "Train horn", "Clock",
    "Banjo", "Goat", "Baby cry, infant cry", "Bus", "Chainsaw", "Cat", "Horse", "Toilet flush",
    "Rodents, rats, mice", "Accordion", "Mandolin",
]


@register_dataset("ave")
class AVE(AudioVisualClips):
    summary = "AVE audio-visual events, 28 classes (on disk: AVE lists, audio/, visual/)"
    display = "AVE"
    folder = "AVE"
    layout = ("trainSet.txt/valSet.txt/testSet.txt lines 'Category&VideoID&Quality&Start&End', "
              "audio/<VideoID>.wav|.npy, visual/<VideoID>/*.jpg")
    num_classes = len(CLASSES)
    pinned = CLASSES

    def index(self, root: Path, classes: list[str]) -> dict[str, list[Item]]:
        out = {}
        for split, file in (("train", "trainSet.txt"), ("val", "valSet.txt"), ("test", "testSet.txt")):
            path = root / file
            if not path.is_file():
                if split == "val":
                    continue
                raise UsageError(f"ave list file {path} is missing; expected layout: {self.layout}")
            items = []
            for line_no, line in enumerate(path.read_text().splitlines(), start=1):
                fields = line.strip().split("&")
                if not line.strip() or fields[0] == "Category":
                    continue
                if len(fields) < 2:
                    raise UsageError(f"{path} line {line_no}: expected 'Category&VideoID&Quality&Start&End', "
                                     f"got {line.strip()!r}; fix that line")
                label = self.label_of(fields[0], classes, f"{path} line {line_no}")
                items.append(Item(fields[1].strip(), label, str(path)))
            out[split] = items
        return out

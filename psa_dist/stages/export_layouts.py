"""Where ``psa-dist export`` puts images, labels and the image list in each layout (plain data,
importable without torch: the command line's ``--layout`` choices)."""
from __future__ import annotations

LAYOUTS = ("voc", "mmseg")


def layout_paths(layout: str, split: str) -> dict:
    """The paths of ``layout`` (one of :data:`LAYOUTS`), relative to the export's directory."""
    if layout == "voc":
        return {"images": "JPEGImages", "labels": "SegmentationClassAug",
                "list": f"ImageSets/Segmentation/{split}.txt"}
    return {"images": f"img_dir/{split}", "labels": f"ann_dir/{split}",
            "list": f"splits/{split}.txt"}

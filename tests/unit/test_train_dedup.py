"""#11.6: `train prepare` leaves near-duplicates of test images out of the reference DB (CLS cosine), and the
eval commands refuse a DB that was not deduplicated against their test images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from xsr_core.train.data import TEST_EXCLUSION, load_items
from xsr_core.train.synthetic import make_image
from xsr_helpers import prepare_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_prepare_excludes_near_duplicates_of_test_images(tiny_zoo, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rows = []
    for i in range(10):  # each image twice: a PNG and a re-encoded, slightly resized JPEG (other bytes, same content)
        img, cap = make_image(500 + i, 128)
        img.save(imgs / f"a{i:02d}.png")
        img.resize((120, 120), Image.BICUBIC).save(imgs / f"a{i:02d}_copy.jpg", quality=90)
        rows += [{"image": f"a{i:02d}.png", "caption": cap}, {"image": f"a{i:02d}_copy.jpg", "caption": cap}]
    (imgs / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = tmp_path / "data"
    info = prepare_folder(data, tiny_zoo["clip_vision"], imgs, split="6,8,6", min_side=64, dedup_threshold=0.99)
    items = load_items(data)
    twin = {Path(it["source"]).name.split(".")[0].removesuffix("_copy"): [] for it in items}
    for it in items:
        twin[Path(it["source"]).name.split(".")[0].removesuffix("_copy")].append(it["split"])
    expected = sum(s.count("reference") for s in twin.values() if "test" in s)  # references whose twin is a test image
    assert expected >= 1, twin  # the split (by content hash) puts some twins on both sides
    assert info["dedup"] == {"threshold": 0.99, "test_images": 6, "excluded_references": expected}, info["dedup"]
    from xsr_core.refdb import ReferenceDB

    assert ReferenceDB.open(data / "refdb").n == 8 - expected
    rec = json.loads((data / "refdb" / TEST_EXCLUSION).read_text())
    assert sorted(rec["test_sha256"]) == sorted(it["sha256"] for it in items if it["split"] == "test")

    # eval run's check: the DB excludes the test split's files, not other images
    from xsr_core.eval.run import RunError, check_refdb_exclusion

    api = {"db": {"class_type": "XSR_LoadReferenceDB", "inputs": {"db_name": "d"}}}
    models = tmp_path / "models"
    (models / "xsr_refdb").mkdir(parents=True)
    (models / "xsr_refdb" / "d").symlink_to(data / "refdb", target_is_directory=True)
    tests = [Path(it["source"]) for it in items if it["split"] == "test"]
    assert check_refdb_exclusion(api, tests, models, allow=False)["dbs"]["d"]["not_excluded"] == 0
    others = [Path(it["source"]) for it in items if it["split"] == "train"]
    with pytest.raises(RunError, match="not deduplicated against 6 of the 6"):
        check_refdb_exclusion(api, others, models, allow=False)
    assert check_refdb_exclusion(api, others, models, allow=True)["dbs"]["d"]["not_excluded"] == 6

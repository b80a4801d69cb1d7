"""Reference database (DESIGN §2.2): HR images → CLIP CLS vectors in a faiss index + metadata.

Public API::

    from xsr_core.refdb import ReferenceDB, RefDBError, build_db, BuildConfig
    db = ReferenceDB.open("models/xsr_refdb/imagenet")      # validated, cached by db.signature()
    db.check_encoder(fingerprint)                           # refuses a different CLIP encoder
    scores, ids = db.search(cls_query, k=4)                 # (B, k) cosine, faiss ids
    images = db.load_images(ids[0])                         # PIL RGB references

Command line: ``python -m xsr_core.refdb {build,add,search,info,verify,export,merge} ...``.
"""

from .build import BuildConfig, add_images, build_db, export_db, finalize, merge_shards, parse_shard
from .db import RefRecord, ReferenceDB, db_signature, verify_db
from .index import IndexPlan, choose_index, plan_for_key
from .store import RefDBError

__all__ = [
    "BuildConfig",
    "IndexPlan",
    "RefDBError",
    "RefRecord",
    "ReferenceDB",
    "add_images",
    "build_db",
    "choose_index",
    "db_signature",
    "export_db",
    "finalize",
    "merge_shards",
    "parse_shard",
    "plan_for_key",
    "verify_db",
]

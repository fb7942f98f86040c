"""The data pipeline: records (Datum), LMDB/LevelDB reading, the transform_param transformer, prefetching.

    LMDB/LevelDB ─► open_source (LMDBSource or LevelDBSource) ─► parse_datum / datum_to_array ─► DataTransformer ─► Prefetcher ─► Data layer
"""
from ..formats.datum import (array_to_datum, datum_to_array, decode_image, encode_datum, encode_image,  # noqa: F401
                    hwc_to_chw, chw_to_hwc, join_root, parse_datum, read_image, read_image_list,
                    record_where)
from .lmdb_source import (LMDBSource, check_backend, close_lmdb, count_records, iterate_lmdb,  # noqa: F401
                          open_lmdb, set_solver_rank, solver_count, solver_rank)
from .db import NewDatabase, db_kind, iterate_db, open_source, open_writer  # noqa: F401
from .prefetch import Prefetcher  # noqa: F401
from .transformer import DataTransformer, load_mean_file, load_pca_file  # noqa: F401

"""darkstore storage: the Zarr store that holds a teacher ensemble's soft targets.

Knows nothing of models or HTTP; both the teacher service and the student
trainer depend on it, and it depends on neither.
"""

from ._zarr import copy_store
from .errors import *  # noqa: F401,F403
from .location import Location
from .reader import Chunk, StoreReader, open_store
from .fields import bytes_per_row
from .schema import SCHEMA_VERSION, StoreMeta, TeacherRecord, TransferSetRecord, chunk_bounds, sample_order
from .writer import FLOAT16_FLOOR, StoreWriter

__version__ = "0.1.0"

__all__ = [
    "Chunk", "copy_store", "Location", "StoreReader", "open_store", "SCHEMA_VERSION", "StoreMeta", "TeacherRecord",
    "TransferSetRecord", "bytes_per_row", "chunk_bounds", "sample_order", "FLOAT16_FLOOR", "StoreWriter", "__version__",
]

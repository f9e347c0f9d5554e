"""The steps the retrieval scripts run on a training workdir: build the index, evaluate, search.

Each loads the workdir's exported embedder (`embedder/`), never the training code, and reads
the data through `facejax.data.prepare_data` with the image size and resize mode the embedder
was exported for. Each step lives in its own module; this one gathers them for the scripts:
- `facejax.rundir`: the layout and `read_run_config`;
- `run_data`: `prepare_run_data`, `run_face_crop` (the run's data as the embedder takes it);
- `run_index`: `build_workdir_index`;
- `run_eval`: `evaluate_workdir`, `kept_starting_point`, `COMPETITION_JSON`;
- `run_search`: `list_query_images`, `search_workdir` (and its grid); `search_table`:
  `format_search_table`;
- `run_compare`: `compare_workdirs`.
"""

from facejax.retrieval.run_compare import compare_workdirs
from facejax.retrieval.run_data import prepare_run_data, run_face_crop
from facejax.retrieval.run_eval import COMPETITION_JSON, evaluate_workdir, kept_starting_point
from facejax.retrieval.run_index import SHARD_SIZE, build_workdir_index
from facejax.retrieval.run_search import list_query_images, search_workdir
from facejax.retrieval.search_table import format_search_table
from facejax.rundir import EMBEDDER_DIR, INDEX_DIR, REPORT_DIR, read_run_config
from facejax.rundir import INDEX_WORK_DIR as WORK_DIR

__all__ = ["COMPETITION_JSON", "EMBEDDER_DIR", "INDEX_DIR", "REPORT_DIR", "SHARD_SIZE",
           "WORK_DIR", "build_workdir_index", "compare_workdirs", "evaluate_workdir",
           "format_search_table", "kept_starting_point", "list_query_images",
           "prepare_run_data", "read_run_config", "run_face_crop", "search_workdir"]

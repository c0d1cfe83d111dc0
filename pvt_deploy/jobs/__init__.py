"""Bulk jobs over many images, torch-free, on the public ``Runtime`` API: inputs -> rows -> Parquet / JSONL / CSV /
``.npy`` or ``.npz`` folders, resumable, locked, on the local engine or Ray Data (one ``JobEngine`` Protocol)."""

from pvt_deploy.jobs.engine import DEFAULT_CHUNK_SIZE, JobEngine, JobEvents, JobPlan, JobResult, LocalEngine
from pvt_deploy.jobs.inputs import collect_inputs, read_path_list
from pvt_deploy.jobs.records import iter_parts, label_indexes, prediction_lines, prediction_record
from pvt_deploy.jobs.run import ENGINES, RayEngine, engine_named, run_job
from pvt_deploy.jobs.store import Part, output_format, read_run_info
from pvt_deploy.jobs.tasks import JobSpec

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ENGINES",
    "JobEngine",
    "JobEvents",
    "JobPlan",
    "JobResult",
    "JobSpec",
    "LocalEngine",
    "Part",
    "RayEngine",
    "collect_inputs",
    "engine_named",
    "iter_parts",
    "label_indexes",
    "output_format",
    "prediction_lines",
    "prediction_record",
    "read_path_list",
    "read_run_info",
    "run_job",
]

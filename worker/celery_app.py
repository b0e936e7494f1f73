"""The Celery app: Redis broker, late acks, one prefork pool process per GPU, no CUDA in the parent.

Run a GPU worker with ``celery -A worker.celery_app:celery_app worker`` (one worker per GPU host;
``LETHE_WORKER_CONCURRENCY`` = its number of GPUs). The parent process imports no torch: tensors
are touched only inside the pool processes, which CUDA needs because it does not survive fork.
"""

import os
from typing import Any

from billiard.process import current_process
from celery import Celery, signals

from app.dispatch import RUN_JOB_TASK, broker_transport_options
from app.ledger.db import get_engine
from app.logging import configure_logging
from app.settings import Settings, get_settings

# Warm shutdown (SIGTERM) waits this long for a job before requeueing it: jobs resume from the
# ledger, so a quick hand-back beats a long wait.
SOFT_SHUTDOWN_SECONDS = 10.0


def check_timings(settings: Settings) -> None:
    if settings.task_time_limit_seconds >= settings.visibility_timeout_seconds:
        raise ValueError(
            "task_time_limit_seconds must be below visibility_timeout_seconds, or Redis "
            "redelivers a job that is still running to a second worker"
        )
    if settings.heartbeat_seconds >= settings.lease_seconds:
        raise ValueError(
            "heartbeat_seconds must be below lease_seconds, or live jobs look lost to the sweeper"
        )


def celery_config(settings: Settings) -> dict[str, Any]:
    check_timings(settings)
    return {
        "broker_url": settings.broker_url or None,
        "broker_transport_options": broker_transport_options(settings),
        "broker_connection_retry_on_startup": True,
        # A job is acknowledged only once it has finished; a job whose pool process died is
        # requeued, and the ledger's attempt counter (not the broker) bounds the requeues.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit_seconds,
        # Without this a worker that lost Redis keeps running a job that Redis gives to another.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_soft_shutdown_timeout": SOFT_SHUTDOWN_SECONDS,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # Outcomes live in the ledger; nobody polls Celery results, so there is no result backend.
        "task_ignore_result": True,
        "task_default_queue": settings.gpu_queue,
        "task_routes": {RUN_JOB_TASK: {"queue": settings.gpu_queue}},
        "worker_pool": "prefork",
        "worker_concurrency": settings.worker_concurrency,
        "worker_max_tasks_per_child": settings.worker_max_tasks_per_child,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("lethe", set_as_current=False, include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    return app


def gpu_for_pool_process(visible_devices: str, index: int) -> str | None:
    """The one GPU (of ``CUDA_VISIBLE_DEVICES``) that pool process ``index`` keeps."""
    devices = [d for d in visible_devices.split(",") if d.strip()]
    return devices[index % len(devices)].strip() if len(devices) > 1 else None


@signals.setup_logging.connect
def _setup_logging(**_kwargs: Any) -> None:
    configure_logging()  # connected: Celery leaves the root logger to us


@signals.worker_process_init.connect
def _init_pool_process(**_kwargs: Any) -> None:
    # Must stay fast (Celery allows 4 s): no model loading here, only process hygiene.
    get_engine().dispose(close=False)  # never share the parent's database sockets
    index = getattr(current_process(), "index", 0)  # billiard numbers its pool processes
    gpu = gpu_for_pool_process(os.environ.get("CUDA_VISIBLE_DEVICES", ""), index)
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # read when CUDA initialises, in this process


celery_app = make_celery(get_settings())

"""The Celery settings that make long GPU jobs safe (issue 5), asserted one by one."""

import subprocess
import sys

import pytest

from app.dispatch import RUN_JOB_TASK
from app.settings import Settings
from worker.celery_app import celery_app, gpu_for_pool_process, make_celery
from worker.tasks import JobTask


@pytest.fixture
def settings() -> Settings:
    return Settings(broker_url="redis://127.0.0.1:6379/0", worker_concurrency=2, gpu_queue="gpu-q")


def test_late_acks_bounded_requeue_and_one_job_per_process(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True  # bounded by the job's attempts in the ledger
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_pool == "prefork"
    assert conf.worker_concurrency == settings.worker_concurrency  # one process per GPU
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True


def test_time_limit_is_below_the_visibility_timeout(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert conf.broker_transport_options["visibility_timeout"] == (
        settings.visibility_timeout_seconds
    )
    assert conf.task_time_limit == settings.task_time_limit_seconds
    assert conf.task_time_limit < conf.broker_transport_options["visibility_timeout"]
    assert conf.result_backend is None  # so no result-backend visibility timeout to keep in step


def test_a_time_limit_at_or_above_the_visibility_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="visibility"):
        make_celery(Settings(task_time_limit_seconds=3600, visibility_timeout_seconds=3600))


def test_a_heartbeat_slower_than_the_lease_is_refused() -> None:
    with pytest.raises(ValueError, match="lease"):
        make_celery(Settings(heartbeat_seconds=60, lease_seconds=30))


def test_json_only_and_a_dedicated_gpu_queue(settings: Settings) -> None:
    conf = make_celery(settings).conf
    assert (conf.task_serializer, conf.result_serializer) == ("json", "json")
    assert list(conf.accept_content) == ["json"]
    assert conf.task_default_queue == "gpu-q"
    assert conf.task_routes == {RUN_JOB_TASK: {"queue": "gpu-q"}}


def test_the_task_is_registered_by_name_with_the_lease_releasing_request() -> None:
    task = celery_app.tasks[RUN_JOB_TASK]
    assert isinstance(task, JobTask)
    assert task.Request == "worker.tasks:JobRequest"


def test_each_pool_process_keeps_one_gpu() -> None:
    assert [gpu_for_pool_process("0,1", i) for i in range(3)] == ["0", "1", "0"]
    assert gpu_for_pool_process("3", 0) is None  # already pinned: leave it
    assert gpu_for_pool_process("", 0) is None


def test_the_worker_parent_never_imports_torch() -> None:
    """CUDA does not survive fork: the prefork parent must not load torch (invariant 5)."""
    code = (
        "import sys, worker.celery_app, worker.tasks, worker.scheduler, worker.cli; "
        "sys.exit('torch' in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

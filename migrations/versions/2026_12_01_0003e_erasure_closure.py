"""erasure closure: purged artifacts, integrity failures, no plain digest of erased samples

Revision ID: 0003e
Revises: 0001
Create Date: 2026-12-01 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003e"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "purged_artifacts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("digest_algorithm", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("request_ids", sa.JSON(), nullable=False),
        sa.Column("purged_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_purged_artifacts_job_id_jobs")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_purged_artifacts")),
    )
    op.create_index(op.f("ix_purged_artifacts_job_id"), "purged_artifacts", ["job_id"])
    op.create_index(op.f("ix_purged_artifacts_key"), "purged_artifacts", ["key"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("integrity_failures", sa.JSON(), nullable=False, server_default="[]")
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("integrity_failures", server_default=None)
    with op.batch_alter_table("samples") as batch:
        batch.alter_column("content_sha256", existing_type=sa.String(length=64), nullable=True)


def downgrade() -> None:
    # Erased samples have no digest left to restore: they get an empty one.
    op.execute("UPDATE samples SET content_sha256 = '' WHERE content_sha256 IS NULL")
    with op.batch_alter_table("samples") as batch:
        batch.alter_column("content_sha256", existing_type=sa.String(length=64), nullable=False)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("integrity_failures")
    op.drop_index(op.f("ix_purged_artifacts_key"), table_name="purged_artifacts")
    op.drop_index(op.f("ix_purged_artifacts_job_id"), table_name="purged_artifacts")
    op.drop_table("purged_artifacts")

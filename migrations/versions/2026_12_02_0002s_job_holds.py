"""job holds: the held state, the planning-time screen, the hold's stage and reason, approvals

Revision ID: 0002s
Revises: 0005n
Create Date: 2026-12-02 17:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002s"
down_revision: str | None = "0005n"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The states are plain strings without a CHECK constraint: "held" needs no change of the column,
# only of the type's declared values.
STATES = ("queued", "running", "succeeded", "failed", "dead")


def _state(*extra: str) -> sa.Enum:
    return sa.Enum(*STATES, *extra, name="jobstate", native_enum=False, length=16)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("state", existing_type=_state(), type_=_state("held"))
        batch.add_column(sa.Column("screening", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column(
                "hold_stage",
                sa.Enum("screening", "promotion", name="holdstage", native_enum=False, length=16),
                nullable=True,
            )
        )
        batch.add_column(sa.Column("hold_reason", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("approved_stages", sa.JSON(), nullable=False, server_default="[]")
        )
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("approved_stages", server_default=None)


def downgrade() -> None:
    # A held job cannot be represented before this revision: it fails, with its reason.
    op.execute(
        "UPDATE jobs SET state = 'failed', error = 'held when the schema was downgraded: ' "
        "|| COALESCE(hold_reason, '') WHERE state = 'held'"
    )
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("approved_stages")
        batch.drop_column("hold_reason")
        batch.drop_column("hold_stage")
        batch.drop_column("screening")
        batch.alter_column("state", existing_type=_state("held"), type_=_state())

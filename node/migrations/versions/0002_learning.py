"""learning: labels, folds, datasets, training runs

Revision ID: 0002
Revises: 0001

"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("path", sa.String(length=512), nullable=False),
        sa.Column("study_count", sa.Integer(), nullable=False),
        sa.Column("summary", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
        sa.UniqueConstraint("kind", "version", name="uq_datasets_kind_version"),
    )
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_datasets_digest"), ["digest"], unique=False)

    op.create_table(
        "patient_folds",
        sa.Column("pseudo_patient_id", sa.String(length=128), nullable=False),
        sa.Column("fold", sa.Integer(), nullable=False),
        sa.Column("stratum", sa.String(length=16), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("pseudo_patient_id", name=op.f("pk_patient_folds")),
    )
    op.create_table(
        "learn_studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("pseudo_study_uid", sa.String(length=128), nullable=False),
        sa.Column("pseudo_patient_id", sa.String(length=128), nullable=False),
        sa.Column("source_path", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_learn_studies_study_id_studies"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_learn_studies")),
        sa.UniqueConstraint("pseudo_study_uid", name=op.f("uq_learn_studies_pseudo_study_uid")),
        sa.UniqueConstraint("study_id", name=op.f("uq_learn_studies_study_id")),
    )
    with op.batch_alter_table("learn_studies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_learn_studies_pseudo_patient_id"), ["pseudo_patient_id"], unique=False
        )

    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column(
            "state",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                name="runstate",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("slot", sa.String(length=64), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("lease_owner", sa.String(length=128), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("run_dir", sa.String(length=512), nullable=True),
        sa.Column("candidate", sa.String(length=128), nullable=True),
        sa.Column("params", sa.Text(), nullable=True),
        sa.Column("metrics", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            name=op.f("fk_training_runs_dataset_id_datasets"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_runs")),
        sa.UniqueConstraint("slot", name=op.f("uq_training_runs_slot")),
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_training_runs_dataset_id"), ["dataset_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_training_runs_state"), ["state"], unique=False)

    op.create_table(
        "label_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("learn_study_id", sa.Integer(), nullable=False),
        sa.Column(
            "value",
            sa.Enum(
                "non-covid",
                "mild",
                "moderate",
                "severe",
                "critical",
                "covid-unknown",
                name="labelvalue",
                native_enum=False,
                length=16,
            ),
            nullable=True,
        ),
        sa.Column(
            "source",
            sa.Enum(
                "cli",
                "csv",
                "web",
                "dicom",
                "import",
                name="labelsource",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("supersedes_id", sa.Integer(), nullable=True),
        sa.Column("source_ref", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(
            ["learn_study_id"],
            ["learn_studies.id"],
            name=op.f("fk_label_events_learn_study_id_learn_studies"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["supersedes_id"],
            ["label_events.id"],
            name=op.f("fk_label_events_supersedes_id_label_events"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_label_events")),
    )
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_label_events_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_label_events_learn_study_id"), ["learn_study_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_label_events_source_ref"), ["source_ref"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("label_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_label_events_source_ref"))
        batch_op.drop_index(batch_op.f("ix_label_events_learn_study_id"))
        batch_op.drop_index(batch_op.f("ix_label_events_at"))

    op.drop_table("label_events")
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_runs_state"))
        batch_op.drop_index(batch_op.f("ix_training_runs_dataset_id"))

    op.drop_table("training_runs")
    with op.batch_alter_table("learn_studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_learn_studies_pseudo_patient_id"))

    op.drop_table("learn_studies")
    op.drop_table("patient_folds")
    with op.batch_alter_table("datasets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_datasets_digest"))

    op.drop_table("datasets")

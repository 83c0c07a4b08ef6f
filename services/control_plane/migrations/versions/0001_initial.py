"""Tenants, keys, conversation records, feedback and reviews.

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Apply this revision."""
    op.create_table(
        "control_revision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.Integer(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The one row every change to tenants and keys increments; replicas poll it.
    op.execute(sa.text("INSERT INTO control_revision (id, value, changed_at) VALUES (1, 0, CURRENT_TIMESTAMP)"))
    op.create_table(
        "conversation_records",
        sa.Column("reply_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=True),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column("intent", sa.String(length=32), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("adapter", sa.String(length=160), nullable=True),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("question_vector", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("reply_id"),
    )
    with op.batch_alter_table("conversation_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_conversation_records_user_hash"), ["user_hash"], unique=False)
        batch_op.create_index("ix_records_tenant_created", ["tenant", "created_at"], unique=False)
        batch_op.create_index("ix_records_tenant_outcome_created", ["tenant", "outcome", "created_at"], unique=False)

    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("reply_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("helpful", sa.Boolean(), nullable=True),
        sa.Column("resolved", sa.Boolean(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_feedback_reply_id"), ["reply_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_feedback_user_hash"), ["user_hash"], unique=False)
        batch_op.create_index("ix_feedback_tenant_created", ["tenant", "created_at"], unique=False)

    op.create_table(
        "reviews",
        sa.Column("reply_id", sa.String(length=64), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("user_hash", sa.String(length=64), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("question", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=False),
        sa.Column("reviewer", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("reply_id"),
    )
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reviews_tenant"), ["tenant"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_user_hash"), ["user_hash"], unique=False)

    op.create_table(
        "tenants",
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("persona", sa.Text(), nullable=False),
        sa.Column("fallback_message", sa.Text(), nullable=True),
        sa.Column("relevance_threshold", sa.Float(), nullable=True),
        sa.Column("adapter", sa.String(length=64), nullable=True),
        sa.Column("storefront_url", sa.String(length=2048), nullable=True),
        sa.Column("credentials_env", sa.String(length=128), nullable=True),
        sa.Column("tools_enabled", sa.Boolean(), nullable=False),
        sa.Column("retention_days", sa.Integer(), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("managed_by", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant"),
    )
    op.create_table(
        "api_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=80), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=True),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("origin", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("replaced_by", sa.String(length=32), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.tenant"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key_id"),
        sa.UniqueConstraint("digest"),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_tenant"), ["tenant"], unique=False)


def downgrade() -> None:
    """Undo this revision."""
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_tenant"))

    op.drop_table("api_keys")
    op.drop_table("tenants")
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reviews_user_hash"))
        batch_op.drop_index(batch_op.f("ix_reviews_tenant"))

    op.drop_table("reviews")
    with op.batch_alter_table("feedback", schema=None) as batch_op:
        batch_op.drop_index("ix_feedback_tenant_created")
        batch_op.drop_index(batch_op.f("ix_feedback_user_hash"))
        batch_op.drop_index(batch_op.f("ix_feedback_reply_id"))

    op.drop_table("feedback")
    with op.batch_alter_table("conversation_records", schema=None) as batch_op:
        batch_op.drop_index("ix_records_tenant_outcome_created")
        batch_op.drop_index("ix_records_tenant_created")
        batch_op.drop_index(batch_op.f("ix_conversation_records_user_hash"))

    op.drop_table("conversation_records")
    op.drop_table("control_revision")

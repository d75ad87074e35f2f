"""audit_log append-only: triggers refuse DELETE and every UPDATE but the one seal

Revision ID: 0004
Revises: 0003

The sealer (:func:`node.work.audit.seal`) sets ``prev_hash`` and ``row_hash``
of a row once, from ``NULL``; nothing else may change or remove a row.  An
insert must leave both hashes ``NULL`` (only the sealer writes them).

PostgreSQL: one trigger function for INSERT, UPDATE and DELETE, and a TRUNCATE
trigger.  On INSERT it also takes the shared advisory lock the sealer takes
exclusively (key 0x6C756E6761756474, :data:`node.work.audit.ADVISORY_LOCK_KEY`)
and only then draws the row's id from the table's sequence (the column's own
default is dropped): a row's id is never below one already sealed, whatever
order transactions commit in.

SQLite: ``RAISE(ABORT, ...)`` triggers (one writer at a time already orders ids
and commits).  A later migration that rebuilds ``audit_log`` with
``batch_alter_table`` must create them again.
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_LOCK_KEY = 0x6C756E6761756474  # node.work.audit.ADVISORY_LOCK_KEY (frozen here, as migrations are)
_MESSAGE = ("audit_log is append-only: rows cannot be changed or deleted "
            "(only their hashes are set, once, when sealed)")

_UNCHANGED = ("NEW.id IS OLD.id AND NEW.at IS OLD.at AND NEW.actor IS OLD.actor "
              "AND NEW.action IS OLD.action AND NEW.study_id IS OLD.study_id "
              "AND NEW.detail IS OLD.detail")
_SEALING = ("OLD.prev_hash IS NULL AND OLD.row_hash IS NULL "
            "AND NEW.prev_hash IS NOT NULL AND NEW.row_hash IS NOT NULL")

_PG_FUNCTION = f"""
CREATE FUNCTION audit_log_append_only() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.prev_hash IS NOT NULL OR NEW.row_hash IS NOT NULL THEN
            RAISE EXCEPTION 'audit_log: a new row is inserted unsealed (prev_hash and row_hash NULL)';
        END IF;
        PERFORM pg_advisory_xact_lock_shared({_LOCK_KEY});
        NEW.id := nextval(pg_get_serial_sequence(
            format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), 'id'));
        RETURN NEW;
    ELSIF TG_OP = 'UPDATE' THEN
        IF {_SEALING}
           AND {_UNCHANGED.replace(" IS ", " IS NOT DISTINCT FROM ")} THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION '{_MESSAGE}';
END;
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PG_FUNCTION)
        op.execute("ALTER TABLE audit_log ALTER COLUMN id DROP DEFAULT")
        op.execute("CREATE TRIGGER audit_log_append_only BEFORE INSERT OR UPDATE OR DELETE "
                   "ON audit_log FOR EACH ROW EXECUTE FUNCTION audit_log_append_only()")
        op.execute("CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log "
                   "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()")
        return
    op.execute("CREATE TRIGGER audit_log_insert_unsealed BEFORE INSERT ON audit_log "
               "WHEN NEW.prev_hash IS NOT NULL OR NEW.row_hash IS NOT NULL BEGIN "
               "SELECT RAISE(ABORT, 'audit_log: a new row is inserted unsealed "
               "(prev_hash and row_hash NULL)'); END")
    op.execute(f"CREATE TRIGGER audit_log_update_once BEFORE UPDATE ON audit_log "
               f"WHEN NOT ({_SEALING} AND {_UNCHANGED}) BEGIN "
               f"SELECT RAISE(ABORT, '{_MESSAGE}'); END")
    op.execute(f"CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log BEGIN "
               f"SELECT RAISE(ABORT, '{_MESSAGE}'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_log_no_truncate ON audit_log")
        op.execute("DROP TRIGGER audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION audit_log_append_only()")
        op.execute("ALTER TABLE audit_log ALTER COLUMN id SET DEFAULT "
                   "nextval(pg_get_serial_sequence('audit_log', 'id'))")
        return
    for name in ("audit_log_no_delete", "audit_log_update_once", "audit_log_insert_unsealed"):
        op.execute(f"DROP TRIGGER {name}")

//! The hub's durable state in SQLite (`hub.db` in the state directory): which SCIM users and
//! groups each application's reconciler manages, and the history of runs with their
//! per-resource operations, which survives hub restarts.
//!
//! Only the hub opens this database. It stores no secret: resource ids and names, counts and
//! the administrator-facing messages. A run is recorded when it starts (as running) and again
//! when it ends, with its operations in one transaction, so the history never holds half a
//! run's operations; a run the hub never finished (it crashed or was stopped) is marked
//! interrupted at the next start instead of vanishing or staying "running" forever.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::messages::hub::{RunState, RunSummary};
use crate::scim::outcome::ResourceOp;

/// Runs kept per application by default; older runs and their operations are pruned as new
/// ones arrive.
pub const RUNS_KEPT: usize = 1000;

/// One stored operation: its position in its run (1-based, plan order) and the record.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredOperation {
    pub seq: u32,
    #[serde(flatten)]
    pub record: ResourceOp,
}

/// Errors of the state store. They name the database file.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot create the hub state directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Handle on the state database. Calls are short; one connection behind a mutex is enough.
pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
    runs_kept: usize,
}

/// The tables of managed resource ids; the names are fixed, never taken from input.
#[derive(Clone, Copy)]
enum ManagedTable {
    Users,
    Groups,
}

impl ManagedTable {
    fn name(self) -> &'static str {
        match self {
            ManagedTable::Users => "managed_users",
            ManagedTable::Groups => "managed_groups",
        }
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS managed_users (
    app TEXT NOT NULL,
    scim_id TEXT NOT NULL,
    PRIMARY KEY (app, scim_id)
);
CREATE TABLE IF NOT EXISTS managed_groups (
    app TEXT NOT NULL,
    scim_id TEXT NOT NULL,
    PRIMARY KEY (app, scim_id)
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    started_unix_ms INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    summary TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'finished'
);
CREATE INDEX IF NOT EXISTS runs_by_app ON runs (app, id);
CREATE TABLE IF NOT EXISTS operations (
    run_id INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    record TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
";

impl Store {
    /// Opens (creating if needed) `hub.db` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(state_dir).map_err(|source| StoreError::Dir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join("hub.db");
        let conn = Connection::open(&path).map_err(|source| StoreError::Sqlite {
            path: path.clone(),
            source,
        })?;
        let store = Store {
            path,
            conn: Mutex::new(conn),
            runs_kept: RUNS_KEPT,
        };
        store.with(|c| {
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.execute_batch(SCHEMA)?;
            // Databases made before runs had a state: every run they hold finished.
            let has_state = c
                .prepare("SELECT 1 FROM pragma_table_info('runs') WHERE name = 'state'")?
                .exists([])?;
            if !has_state {
                c.execute_batch(
                    "ALTER TABLE runs ADD COLUMN state TEXT NOT NULL DEFAULT 'finished'",
                )?;
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Keep the last `n` (at least 1) runs per application instead of [`RUNS_KEPT`].
    pub fn with_runs_kept(mut self, n: usize) -> Store {
        self.runs_kept = n.max(1);
        self
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|source| StoreError::Sqlite {
            path: self.path.clone(),
            source,
        })
    }

    /// SCIM ids of the users this hub created or adopted in `app`.
    pub fn managed_users(&self, app: &str) -> Result<HashSet<String>, StoreError> {
        self.managed(ManagedTable::Users, app)
    }

    /// Replaces the managed user set of `app` in one transaction.
    pub fn set_managed_users(&self, app: &str, ids: &HashSet<String>) -> Result<(), StoreError> {
        self.set_managed(ManagedTable::Users, app, ids)
    }

    /// SCIM ids of the groups this hub created or adopted in `app`.
    pub fn managed_groups(&self, app: &str) -> Result<HashSet<String>, StoreError> {
        self.managed(ManagedTable::Groups, app)
    }

    /// Replaces the managed group set of `app` in one transaction.
    pub fn set_managed_groups(&self, app: &str, ids: &HashSet<String>) -> Result<(), StoreError> {
        self.set_managed(ManagedTable::Groups, app, ids)
    }

    fn managed(&self, table: ManagedTable, app: &str) -> Result<HashSet<String>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!(
                "SELECT scim_id FROM {} WHERE app = ?1",
                table.name()
            ))?;
            let rows = stmt.query_map(params![app], |r| r.get::<_, String>(0))?;
            rows.collect()
        })
    }

    fn set_managed(
        &self,
        table: ManagedTable,
        app: &str,
        ids: &HashSet<String>,
    ) -> Result<(), StoreError> {
        let name = table.name();
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(&format!("DELETE FROM {name} WHERE app = ?1"), params![app])?;
            {
                let mut insert = tx.prepare(&format!(
                    "INSERT INTO {name} (app, scim_id) VALUES (?1, ?2)"
                ))?;
                for id in ids {
                    insert.execute(params![app, id])?;
                }
            }
            tx.commit()
        })
    }

    /// Stores a finished run with its operations (in plan order) and returns the run's id.
    /// Runs of the same app older than the last `runs_kept` are pruned.
    pub fn record_run(
        &self,
        summary: &RunSummary,
        operations: &[ResourceOp],
    ) -> Result<i64, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let run_id = insert_run(&tx, summary, RunState::Finished)?;
            self.finish_in(&tx, run_id, summary, operations)?;
            tx.commit()?;
            Ok(run_id)
        })
    }

    /// Records that a run of `app` started at `started_unix_ms` and returns its id. It shows
    /// as running in the history until [`Store::finish_run`] or [`Store::interrupt_run`], and
    /// [`Store::last_run`] does not return it meanwhile.
    pub fn begin_run(&self, app: &str, started_unix_ms: u64) -> Result<i64, StoreError> {
        let summary = RunSummary {
            app: app.to_string(),
            started_unix_ms,
            state: RunState::Running,
            ..Default::default()
        };
        self.with(|c| insert_run(c, &summary, RunState::Running))
    }

    /// Stores the end of run `run_id` (begun with [`Store::begin_run`]) with its operations.
    /// A run that is no longer kept (pruned meanwhile) is stored anew; the id it is stored
    /// under is returned.
    pub fn finish_run(
        &self,
        run_id: i64,
        summary: &RunSummary,
        operations: &[ResourceOp],
    ) -> Result<i64, StoreError> {
        let summary = RunSummary {
            state: RunState::Finished,
            ..summary.clone()
        };
        self.with(|c| {
            let tx = c.transaction()?;
            let updated = update_run(&tx, run_id, &summary, RunState::Finished)?;
            let run_id = if updated {
                run_id
            } else {
                insert_run(&tx, &summary, RunState::Finished)?
            };
            self.finish_in(&tx, run_id, &summary, operations)?;
            tx.commit()?;
            Ok(run_id)
        })
    }

    /// Marks run `run_id` interrupted with `message`, if it is still running (the hub is
    /// stopping in the middle of it). Returns whether it was.
    pub fn interrupt_run(&self, run_id: i64, message: &str) -> Result<bool, StoreError> {
        self.interrupt_where("id = ?1", params![run_id], message)
            .map(|n| n > 0)
    }

    /// Marks every run still recorded as running interrupted with `message`: at hub start,
    /// such a run belongs to a hub process that is gone. Returns how many there were.
    pub fn interrupt_unfinished(&self, message: &str) -> Result<usize, StoreError> {
        self.interrupt_where("1 = 1", params![], message)
    }

    fn interrupt_where(
        &self,
        condition: &str,
        args: &[&dyn rusqlite::ToSql],
        message: &str,
    ) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let rows: Vec<(i64, String)> = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT id, summary FROM runs WHERE state = 'running' AND {condition}"
                ))?;
                let rows = stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            for (id, json) in &rows {
                let mut summary: RunSummary = serde_json::from_str(json).unwrap_or_default();
                summary.state = RunState::Interrupted;
                summary.ok = false;
                summary.message = Some(message.to_string());
                update_run(&tx, *id, &summary, RunState::Interrupted)?;
            }
            tx.commit()?;
            Ok(rows.len())
        })
    }

    /// Writes the operations of run `run_id` and prunes the app's runs beyond the kept window.
    fn finish_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        run_id: i64,
        summary: &RunSummary,
        operations: &[ResourceOp],
    ) -> Result<(), rusqlite::Error> {
        {
            let mut insert = tx.prepare(
                "INSERT OR REPLACE INTO operations (run_id, seq, outcome, record) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (i, op) in operations.iter().enumerate() {
                insert.execute(params![
                    run_id,
                    i as i64 + 1,
                    op.result.name(),
                    serde_json::to_string(op).unwrap_or_default()
                ])?;
            }
        }
        // The newest run that falls out of the kept window, if any.
        let cutoff: Option<i64> = tx
            .query_row(
                "SELECT id FROM runs WHERE app = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                params![summary.app, self.runs_kept as i64],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(cutoff) = cutoff {
            tx.execute(
                "DELETE FROM operations WHERE run_id IN \
                 (SELECT id FROM runs WHERE app = ?1 AND id <= ?2)",
                params![summary.app, cutoff],
            )?;
            tx.execute(
                "DELETE FROM runs WHERE app = ?1 AND id <= ?2",
                params![summary.app, cutoff],
            )?;
        }
        Ok(())
    }

    /// The latest run of `app` that is over (finished or interrupted), surviving hub
    /// restarts.
    pub fn last_run(&self, app: &str) -> Result<Option<RunSummary>, StoreError> {
        let row: Option<(i64, String)> = self.with(|c| {
            c.query_row(
                "SELECT id, summary FROM runs WHERE app = ?1 AND state != 'running' \
                 ORDER BY id DESC LIMIT 1",
                params![app],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        Ok(row.and_then(|(id, json)| summary_of(id, &json)))
    }
}

fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Finished => "finished",
        RunState::Running => "running",
        RunState::Interrupted => "interrupted",
    }
}

fn insert_run(
    c: &Connection,
    summary: &RunSummary,
    state: RunState,
) -> Result<i64, rusqlite::Error> {
    let summary = RunSummary {
        state,
        ..summary.clone()
    };
    c.execute(
        "INSERT INTO runs (app, started_unix_ms, duration_ms, summary, state) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            summary.app,
            summary.started_unix_ms as i64,
            summary.duration_ms as i64,
            serde_json::to_string(&summary).unwrap_or_default(),
            state_name(state),
        ],
    )?;
    Ok(c.last_insert_rowid())
}

/// Rewrites run `run_id`; false when no such run is kept.
fn update_run(
    c: &Connection,
    run_id: i64,
    summary: &RunSummary,
    state: RunState,
) -> Result<bool, rusqlite::Error> {
    let summary = RunSummary {
        state,
        ..summary.clone()
    };
    let n = c.execute(
        "UPDATE runs SET duration_ms = ?2, summary = ?3, state = ?4 WHERE id = ?1",
        params![
            run_id,
            summary.duration_ms as i64,
            serde_json::to_string(&summary).unwrap_or_default(),
            state_name(state),
        ],
    )?;
    Ok(n > 0)
}

/// A stored run's summary with its id; `None` when the stored JSON is unreadable.
fn summary_of(run_id: i64, json: &str) -> Option<RunSummary> {
    let mut summary: RunSummary = serde_json::from_str(json).ok()?;
    summary.run_id = run_id;
    Some(summary)
}

impl Store {
    /// Runs of `app`, newest first, older than run `before` when given.
    pub fn runs(
        &self,
        app: &str,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<RunSummary>, StoreError> {
        let rows: Vec<(i64, String)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, summary FROM runs WHERE app = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![app, before.unwrap_or(i64::MAX), limit as i64],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, json)| summary_of(id, &json))
            .collect())
    }
}

impl Store {
    /// Run `run_id` of `app`, if it is kept.
    pub fn run(&self, app: &str, run_id: i64) -> Result<Option<RunSummary>, StoreError> {
        let json: Option<String> = self.with(|c| {
            c.query_row(
                "SELECT summary FROM runs WHERE app = ?1 AND id = ?2",
                params![app, run_id],
                |r| r.get(0),
            )
            .optional()
        })?;
        Ok(json.and_then(|json| summary_of(run_id, &json)))
    }

    /// Operations of run `run_id` in plan order, after position `after` (exclusive) when given;
    /// `failed_only` keeps those that failed. The caller checks that the run belongs to the app.
    pub fn operations(
        &self,
        run_id: i64,
        after: Option<u32>,
        limit: usize,
        failed_only: bool,
    ) -> Result<Vec<StoredOperation>, StoreError> {
        let rows: Vec<(i64, String)> = self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT seq, record FROM operations WHERE run_id = ?1 AND seq > ?2 \
                 AND (?3 = 0 OR outcome = 'failed') ORDER BY seq LIMIT ?4",
            )?;
            let rows = stmt.query_map(
                params![
                    run_id,
                    i64::from(after.unwrap_or(0)),
                    i64::from(failed_only),
                    limit as i64
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            rows.collect()
        })?;
        Ok(rows
            .into_iter()
            .filter_map(|(seq, json)| {
                Some(StoredOperation {
                    seq: u32::try_from(seq).ok()?,
                    record: serde_json::from_str(&json).ok()?,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scim::outcome::{OpKind, OpResult, ResourceKind};

    #[test]
    fn managed_set_and_runs_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let ids: HashSet<String> = ["a".to_string(), "b".to_string()].into();
            store.set_managed_users("crm", &ids).unwrap();
            let groups: HashSet<String> = ["g".to_string()].into();
            store.set_managed_groups("crm", &groups).unwrap();
            store.set_managed_groups("crm", &groups).unwrap();
            let summary = RunSummary {
                app: "crm".into(),
                ok: true,
                created: 2,
                ..Default::default()
            };
            assert_eq!(store.record_run(&summary, &[]).unwrap(), 1);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.managed_users("crm").unwrap().len(), 2);
        assert!(store.managed_users("other").unwrap().is_empty());
        assert_eq!(
            store.managed_groups("crm").unwrap(),
            ["g".to_string()].into()
        );
        assert!(store.managed_groups("other").unwrap().is_empty());
        let last = store.last_run("crm").unwrap().unwrap();
        assert_eq!((last.run_id, last.created), (1, 2));
        assert!(store.last_run("other").unwrap().is_none());
    }

    #[test]
    fn runs_page_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for created in 0..5 {
            let summary = RunSummary {
                app: "crm".into(),
                created,
                ..Default::default()
            };
            store.record_run(&summary, &[]).unwrap();
        }
        let first = store.runs("crm", None, 2).unwrap();
        assert_eq!(first.iter().map(|r| r.run_id).collect::<Vec<_>>(), [5, 4]);
        let next = store.runs("crm", Some(4), 10).unwrap();
        assert_eq!(next.iter().map(|r| r.run_id).collect::<Vec<_>>(), [3, 2, 1]);
        assert_eq!(next[0].created, 2);
        assert!(store.runs("other", None, 10).unwrap().is_empty());
    }

    fn op(i: usize, failed: bool) -> ResourceOp {
        ResourceOp {
            kind: OpKind::Create,
            resource: ResourceKind::User,
            id: None,
            external_id: Some(format!("u{i}")),
            name: format!("user{i}@example.com"),
            members: 0,
            result: if failed {
                OpResult::Failed {
                    message: "rejected (400)".into(),
                }
            } else {
                OpResult::Ok
            },
        }
    }

    #[test]
    fn operations_page_in_plan_order_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let ops: Vec<ResourceOp> = (0..7).map(|i| op(i, i % 3 == 0)).collect();
        let run_id = {
            let store = Store::open(dir.path()).unwrap();
            let summary = RunSummary {
                app: "crm".into(),
                ..Default::default()
            };
            store.record_run(&summary, &ops).unwrap()
        };
        let store = Store::open(dir.path()).unwrap();
        let first = store.operations(run_id, None, 3, false).unwrap();
        assert_eq!(first.iter().map(|o| o.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(first[0].record, ops[0]);
        let rest = store.operations(run_id, Some(3), 100, false).unwrap();
        assert_eq!(rest.iter().map(|o| o.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
        assert_eq!(rest[3].record, ops[6]);
        let failed = store.operations(run_id, None, 100, true).unwrap();
        assert_eq!(failed.iter().map(|o| o.seq).collect::<Vec<_>>(), [1, 4, 7]);
        assert!(store
            .operations(run_id + 1, None, 100, false)
            .unwrap()
            .is_empty());
        assert_eq!(store.run("crm", run_id).unwrap().unwrap().run_id, run_id);
        assert!(store.run("other", run_id).unwrap().is_none());
    }

    #[test]
    fn a_run_that_never_finished_shows_as_interrupted_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (done, unfinished) = {
            let store = Store::open(dir.path()).unwrap();
            let first = store.begin_run("crm", 1_000).unwrap();
            let summary = RunSummary {
                app: "crm".into(),
                started_unix_ms: 1_000,
                ok: true,
                created: 3,
                ..Default::default()
            };
            assert_eq!(
                store.finish_run(first, &summary, &[op(0, false)]).unwrap(),
                first
            );
            let second = store.begin_run("crm", 2_000).unwrap();
            // While it runs, it is in the history, but it is not the Last Sync.
            assert_eq!(
                store.run("crm", second).unwrap().unwrap().state,
                RunState::Running
            );
            assert_eq!(store.last_run("crm").unwrap().unwrap().run_id, first);
            (first, second)
            // The hub dies here: the second run is never finished.
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store
                .interrupt_unfinished("interrupted: the hub stopped")
                .unwrap(),
            1
        );
        let last = store.last_run("crm").unwrap().unwrap();
        assert_eq!(last.run_id, unfinished);
        assert_eq!(last.state, RunState::Interrupted);
        assert!(!last.ok);
        assert_eq!(last.started_unix_ms, 2_000);
        assert_eq!(
            last.message.as_deref(),
            Some("interrupted: the hub stopped")
        );
        let history = store.runs("crm", None, 10).unwrap();
        assert_eq!(
            history
                .iter()
                .map(|r| (r.run_id, r.state))
                .collect::<Vec<_>>(),
            [
                (unfinished, RunState::Interrupted),
                (done, RunState::Finished)
            ]
        );
        assert_eq!(store.operations(done, None, 10, false).unwrap().len(), 1);
        assert_eq!(store.interrupt_unfinished("again").unwrap(), 0, "once");

        // A run interrupted while the hub stops cleanly, and one that finishes after all.
        let third = store.begin_run("crm", 3_000).unwrap();
        assert!(store.interrupt_run(third, "stopping").unwrap());
        assert!(!store.interrupt_run(third, "stopping").unwrap());
        assert_eq!(
            store.run("crm", third).unwrap().unwrap().state,
            RunState::Interrupted
        );
    }

    #[test]
    fn a_database_from_before_run_states_reads_as_finished_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join("hub.db")).unwrap();
            conn.execute_batch(
                "CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, \
                 started_unix_ms INTEGER NOT NULL, duration_ms INTEGER NOT NULL, summary TEXT NOT NULL);\
                 INSERT INTO runs (app, started_unix_ms, duration_ms, summary) VALUES \
                 ('crm', 5, 6, '{\"app\":\"crm\",\"run_id\":0,\"started_unix_ms\":5,\"duration_ms\":6,\"ok\":true,\"desired\":1,\"created\":1,\"updated\":0,\"deactivated\":0,\"deleted\":0,\"unchanged\":0,\"unmanaged\":0,\"failed\":0,\"requests\":2,\"message\":null}');",
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.interrupt_unfinished("x").unwrap(), 0);
        let last = store.last_run("crm").unwrap().unwrap();
        assert_eq!(
            (last.run_id, last.created, last.state),
            (1, 1, RunState::Finished)
        );
        let next = store.begin_run("crm", 10).unwrap();
        assert_eq!(next, 2);
    }

    #[test]
    fn old_runs_are_pruned_with_their_operations() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_runs_kept(2);
        let run = |app: &str| RunSummary {
            app: app.into(),
            ..Default::default()
        };
        let first = store.record_run(&run("crm"), &[op(0, false)]).unwrap();
        let wiki = store.record_run(&run("wiki"), &[]).unwrap();
        store.record_run(&run("crm"), &[]).unwrap();
        assert!(
            store.run("crm", first).unwrap().is_some(),
            "two crm runs kept"
        );
        let third = store.record_run(&run("crm"), &[]).unwrap();
        assert!(store.run("crm", first).unwrap().is_none());
        assert!(store.operations(first, None, 10, false).unwrap().is_empty());
        assert_eq!(store.runs("crm", None, 10).unwrap().len(), 2);
        assert_eq!(store.runs("crm", None, 10).unwrap()[0].run_id, third);
        assert!(
            store.run("wiki", wiki).unwrap().is_some(),
            "each app prunes its own"
        );
    }
}

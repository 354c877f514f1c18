//! The hub's durable state in SQLite: which SCIM users and groups each application's
//! reconciler manages, and the record of every run.
//!
//! Only the hub opens this database. It stores no secret: resource ids, counts and the
//! administrator-facing message of each run.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::messages::hub::RunSummary;

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
    summary TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_app ON runs (app, id);
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
        };
        store.with(|c| {
            c.pragma_update(None, "journal_mode", "WAL")?;
            c.execute_batch(SCHEMA)
        })?;
        Ok(store)
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

    /// Stores a finished run and returns its id.
    pub fn record_run(&self, summary: &RunSummary) -> Result<i64, StoreError> {
        let json = serde_json::to_string(summary).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (app, started_unix_ms, duration_ms, summary) VALUES (?1, ?2, ?3, ?4)",
                params![
                    summary.app,
                    summary.started_unix_ms as i64,
                    summary.duration_ms as i64,
                    json
                ],
            )?;
            Ok(c.last_insert_rowid())
        })
    }

    /// The latest run of `app`, surviving hub restarts.
    pub fn last_run(&self, app: &str) -> Result<Option<RunSummary>, StoreError> {
        let row: Option<(i64, String)> = self.with(|c| {
            c.query_row(
                "SELECT id, summary FROM runs WHERE app = ?1 ORDER BY id DESC LIMIT 1",
                params![app],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })?;
        Ok(row.and_then(|(id, json)| {
            let mut summary: RunSummary = serde_json::from_str(&json).ok()?;
            summary.run_id = id;
            Some(summary)
        }))
    }
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
            .filter_map(|(id, json)| {
                let mut summary: RunSummary = serde_json::from_str(&json).ok()?;
                summary.run_id = id;
                Some(summary)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            assert_eq!(store.record_run(&summary).unwrap(), 1);
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
            store.record_run(&summary).unwrap();
        }
        let first = store.runs("crm", None, 2).unwrap();
        assert_eq!(first.iter().map(|r| r.run_id).collect::<Vec<_>>(), [5, 4]);
        let next = store.runs("crm", Some(4), 10).unwrap();
        assert_eq!(next.iter().map(|r| r.run_id).collect::<Vec<_>>(), [3, 2, 1]);
        assert_eq!(next[0].created, 2);
        assert!(store.runs("other", None, 10).unwrap().is_empty());
    }
}

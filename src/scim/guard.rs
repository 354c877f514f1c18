//! The deletion guard: how many managed resources one run may take out of an application
//! before the hub refuses to go on and asks a human.
//!
//! Pure arithmetic over counts. It never decides *what* is deprovisioned (the plans do), only
//! whether a plan is small enough to apply without asking.

use std::fmt;

/// The largest deprovisioning a run may do: a count, or a percentage of the resources this hub
/// manages in the application. A run that would deprovision more is stopped before it changes
/// anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeletionGuard {
    /// At most this many users deprovisioned plus groups deleted.
    Count(usize),
    /// At most this percentage (1..=100) of the managed users and groups, and always at least
    /// one: a single leaver in a tiny application is not a mass deletion.
    Percent(u32),
}

impl DeletionGuard {
    /// Half of what the hub manages: stops an emptied directory or a mistyped access rule,
    /// lets ordinary leavers through. `deletion_guard = "100%"` switches the guard off.
    pub const DEFAULT: DeletionGuard = DeletionGuard::Percent(50);

    /// How many deprovisions a run may do when the hub manages `managed` resources.
    pub fn limit(&self, managed: usize) -> usize {
        match *self {
            DeletionGuard::Count(n) => n,
            DeletionGuard::Percent(p) => (managed.saturating_mul(p as usize) / 100).max(1),
        }
    }

    /// Ok when deprovisioning `users` users and deleting `groups` groups out of `managed`
    /// managed resources stays within the guard.
    pub fn check(&self, users: usize, groups: usize, managed: usize) -> Result<(), GuardRefusal> {
        let limit = self.limit(managed);
        if users + groups <= limit {
            return Ok(());
        }
        Err(GuardRefusal {
            users,
            groups,
            managed,
            limit,
            guard: *self,
        })
    }
}

impl Default for DeletionGuard {
    fn default() -> Self {
        DeletionGuard::DEFAULT
    }
}

/// As written in hub.toml: `50` or `"10%"`.
impl fmt::Display for DeletionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeletionGuard::Count(n) => write!(f, "{n}"),
            DeletionGuard::Percent(p) => write!(f, "\"{p}%\""),
        }
    }
}

/// A run the guard stopped, with the numbers an administrator needs to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardRefusal {
    /// Users the run would have deactivated or deleted.
    pub users: usize,
    /// Groups the run would have deleted.
    pub groups: usize,
    /// Managed users and groups present in the application before the run.
    pub managed: usize,
    /// What the guard allows for that many.
    pub limit: usize,
    pub guard: DeletionGuard,
}

impl GuardRefusal {
    /// The run's message; `setting` names the key to change (e.g. `apps.crm.deletion_guard`).
    pub fn message(&self, setting: &str) -> String {
        let total = self.users + self.groups;
        let percent = (total * 100).checked_div(self.managed).unwrap_or(100);
        format!(
            "deletion guard stopped the run: it would deprovision {users} user{us} and delete \
             {groups} group{gs} ({total} of the {managed} resources this hub manages there, \
             {percent}%), more than deletion_guard = {guard} allows ({limit}); nothing was \
             changed. If the directory and the access rule are right, raise {setting} in \
             hub.toml (e.g. deletion_guard = {total}) and sync again",
            users = self.users,
            us = if self.users == 1 { "" } else { "s" },
            groups = self.groups,
            gs = if self.groups == 1 { "" } else { "s" },
            managed = self.managed,
            guard = self.guard,
            limit = self.limit,
        )
    }
}

impl fmt::Display for GuardRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message("the app's deletion_guard"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_percent_limits() {
        assert_eq!(DeletionGuard::Count(5).limit(1000), 5);
        assert_eq!(DeletionGuard::Count(0).limit(1000), 0);
        assert_eq!(DeletionGuard::Percent(10).limit(1000), 100);
        assert_eq!(DeletionGuard::Percent(10).limit(15), 1);
        assert_eq!(DeletionGuard::Percent(50).limit(1), 1);
        assert_eq!(DeletionGuard::Percent(100).limit(7), 7);
        assert!(DeletionGuard::Count(2).check(1, 1, 10).is_ok());
        assert!(DeletionGuard::Count(2).check(2, 1, 10).is_err());
        assert!(DeletionGuard::DEFAULT.check(6, 0, 12).is_ok());
        assert!(DeletionGuard::DEFAULT.check(7, 0, 12).is_err());
        assert!(DeletionGuard::Percent(100).check(12, 0, 12).is_ok());
    }

    #[test]
    fn refusal_names_the_numbers_and_the_setting() {
        let refusal = DeletionGuard::Percent(10).check(30, 2, 200).unwrap_err();
        assert_eq!(
            refusal.message("apps.crm.deletion_guard"),
            "deletion guard stopped the run: it would deprovision 30 users and delete 2 groups \
             (32 of the 200 resources this hub manages there, 16%), more than deletion_guard = \
             \"10%\" allows (20); nothing was changed. If the directory and the access rule are \
             right, raise apps.crm.deletion_guard in hub.toml (e.g. deletion_guard = 32) and \
             sync again"
        );
        let one = DeletionGuard::Count(0).check(1, 0, 3).unwrap_err();
        assert!(one.to_string().contains("1 user and delete 0 groups"));
        assert!(one.to_string().contains("deletion_guard = 0 allows (0)"));
    }
}

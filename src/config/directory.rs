//! The directory: a JSON file of users and groups shaped like SCIM core resources, the hub's
//! source of truth, and the access-rule evaluation that picks who an app gets.
//!
//! Owns loading, validating and saving that file and computing [`Granted`]. It must never talk
//! to a SCIM server or decide how to apply a difference; the reconciler does that.
//!
//! Shape (camelCase like SCIM; unknown fields are refused to catch typos):
//! ```json
//! {"users": [{"id": "u1", "userName": "alice", "displayName": "Alice",
//!             "name": {"givenName": "Alice", "familyName": "Liddell", "formatted": "Alice Liddell"},
//!             "emails": [{"value": "alice@example.com", "type": "work", "primary": true}],
//!             "active": true}],
//!  "groups": [{"id": "g1", "displayName": "Engineering",
//!              "members": [{"value": "u1", "type": "User"}, {"value": "g2", "type": "Group"}]}]}
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::hub::AccessRule;
use super::ConfigError;

fn default_true() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// All users and groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directory {
    /// Users.
    #[serde(default)]
    pub users: Vec<DirUser>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<DirGroup>,
}

/// A user (SCIM core User subset).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirUser {
    /// Stable id; becomes the app's `externalId`.
    pub id: String,
    /// Unique login name (case-insensitive).
    pub user_name: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Name parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<PersonName>,
    /// Email addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub emails: Vec<Email>,
    /// Whether the account is active (default true).
    #[serde(default = "default_true", skip_serializing_if = "is_true")]
    pub active: bool,
}

impl DirUser {
    /// An active person with id `id` whose login is also their one (primary, work) email,
    /// and whose display name is `given family`: the shape of the generated directories of
    /// the demo and the benchmarks.
    pub fn person(id: String, login: String, given: &str, family: &str) -> DirUser {
        let full = format!("{given} {family}");
        DirUser {
            id,
            user_name: login.clone(),
            display_name: Some(full.clone()),
            name: Some(PersonName {
                given_name: Some(given.to_owned()),
                family_name: Some(family.to_owned()),
                formatted: Some(full),
            }),
            emails: vec![Email {
                value: login,
                kind: Some("work".into()),
                primary: true,
            }],
            active: true,
        }
    }
}

/// SCIM `name` complex attribute.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersonName {
    /// Given name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub given_name: Option<String>,
    /// Family name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_name: Option<String>,
    /// Full name as displayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub formatted: Option<String>,
}

/// An email address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Email {
    /// The address.
    pub value: String,
    /// SCIM `type` (`work`, `home`, ...).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The primary address.
    #[serde(default, skip_serializing_if = "is_false")]
    pub primary: bool,
}

/// A group (SCIM core Group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirGroup {
    /// Stable id; becomes the app's `externalId`.
    pub id: String,
    /// Unique name (case-insensitive).
    pub display_name: String,
    /// Direct members: users and nested groups.
    #[serde(default)]
    pub members: Vec<Member>,
}

/// A group member reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The member's id.
    pub value: String,
    /// User or nested group (JSON `type`, default `User`).
    #[serde(rename = "type", default)]
    pub kind: MemberKind,
}

/// What a member reference points at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberKind {
    /// A user id.
    #[default]
    User,
    /// A group id (nested group).
    Group,
}

/// What an access rule grants: the desired state of one app.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Granted {
    /// Users granted directly or through a granted group, sorted by id, unique.
    pub users: Vec<DirUser>,
    /// The groups named by the rule, sorted by id.
    pub groups: Vec<GrantedGroup>,
    /// `grant_groups` entries that match no group id or displayName.
    pub unknown_groups: Vec<String>,
    /// `grant_users` entries that match no user id or userName.
    pub unknown_users: Vec<String>,
}

/// A granted group with its members flattened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantedGroup {
    /// Group id.
    pub id: String,
    /// Group displayName.
    pub display_name: String,
    /// Users in the group, directly or through nested groups, limited to granted users, sorted.
    pub member_user_ids: Vec<String>,
}

impl Directory {
    /// Reads and validates the directory file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates directory JSON; `path` names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let dir: Directory = serde_json::from_str(text).map_err(|e| {
            let full = e.to_string();
            let suffix = format!(" at line {} column {}", e.line(), e.column());
            let message = full.strip_suffix(&suffix).unwrap_or(&full);
            ConfigError::Syntax {
                path: path.to_path_buf(),
                line: Some(e.line()),
                message: format!("column {}: {}", e.column(), super::one_line(message)),
                fix: "fix the JSON (users: id, userName, ...; groups: id, displayName, members)"
                    .into(),
            }
        })?;
        dir.validate(path)?;
        Ok(dir)
    }

    /// Writes the directory as pretty JSON, atomically (temp file, fsync, rename).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        json.push('\n');
        super::fsutil::write_atomic(path, json.as_bytes(), 0o644)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, value: &str, reason: &str, fix: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: None,
            key,
            value: Some(value.to_string()),
            problem: format!("{reason}; {fix}"),
        };
        let mut user_ids: HashMap<&str, usize> = HashMap::new();
        let mut user_names: HashMap<String, usize> = HashMap::new();
        for (i, u) in self.users.iter().enumerate() {
            if u.id.trim().is_empty() {
                return Err(invalid(
                    format!("users[{i}].id"),
                    &u.id,
                    "the id is empty",
                    "give every user a stable, unique id",
                ));
            }
            if let Some(first) = user_ids.insert(&u.id, i) {
                return Err(invalid(
                    format!("users[{i}].id"),
                    &u.id,
                    &format!("users[{first}] has the same id"),
                    "give every user its own id",
                ));
            }
            if u.user_name.trim().is_empty() {
                return Err(invalid(
                    format!("users[{i}].userName"),
                    &u.user_name,
                    "the userName is empty",
                    "give every user a unique userName",
                ));
            }
            if let Some(first) = user_names.insert(u.user_name.to_lowercase(), i) {
                return Err(invalid(
                    format!("users[{i}].userName"),
                    &u.user_name,
                    &format!("users[{first}] has the same userName (compared without case)"),
                    "userNames must be unique ignoring case",
                ));
            }
        }
        let mut group_ids: HashMap<&str, usize> = HashMap::new();
        let mut group_names: HashMap<String, usize> = HashMap::new();
        for (i, g) in self.groups.iter().enumerate() {
            if g.id.trim().is_empty() {
                return Err(invalid(
                    format!("groups[{i}].id"),
                    &g.id,
                    "the id is empty",
                    "give every group a stable, unique id",
                ));
            }
            if let Some(first) = group_ids.insert(&g.id, i) {
                return Err(invalid(
                    format!("groups[{i}].id"),
                    &g.id,
                    &format!("groups[{first}] has the same id"),
                    "give every group its own id",
                ));
            }
            if g.display_name.trim().is_empty() {
                return Err(invalid(
                    format!("groups[{i}].displayName"),
                    &g.display_name,
                    "the displayName is empty",
                    "give every group a unique displayName",
                ));
            }
            if let Some(first) = group_names.insert(g.display_name.to_lowercase(), i) {
                return Err(invalid(
                    format!("groups[{i}].displayName"),
                    &g.display_name,
                    &format!("groups[{first}] has the same displayName (compared without case)"),
                    "displayNames must be unique ignoring case",
                ));
            }
        }
        for (i, g) in self.groups.iter().enumerate() {
            for (j, m) in g.members.iter().enumerate() {
                let (known, other, kind, other_kind) = match m.kind {
                    MemberKind::User => (
                        user_ids.contains_key(m.value.as_str()),
                        group_ids.contains_key(m.value.as_str()),
                        "User",
                        "Group",
                    ),
                    MemberKind::Group => (
                        group_ids.contains_key(m.value.as_str()),
                        user_ids.contains_key(m.value.as_str()),
                        "Group",
                        "User",
                    ),
                };
                if !known {
                    let fix = if other {
                        format!(
                            "it is a {} id: set \"type\": \"{other_kind}\"",
                            other_kind.to_lowercase()
                        )
                    } else {
                        format!("add the {} or remove the member", kind.to_lowercase())
                    };
                    return Err(invalid(
                        format!("groups[{i}].members[{j}].value"),
                        &m.value,
                        &format!("group {:?} has a member of type {kind} that is not a {} id in this file", g.id, kind.to_lowercase()),
                        &fix,
                    ));
                }
            }
        }
        Ok(())
    }

    /// User ids in group `root`, directly or through nested groups; a cycle ends the walk.
    fn flattened_users<'a>(
        &'a self,
        root: &'a DirGroup,
        by_id: &HashMap<&str, &'a DirGroup>,
    ) -> BTreeSet<&'a str> {
        let mut users = BTreeSet::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack = vec![root];
        while let Some(g) = stack.pop() {
            if !seen.insert(g.id.as_str()) {
                continue;
            }
            for m in &g.members {
                match m.kind {
                    MemberKind::User => {
                        users.insert(m.value.as_str());
                    }
                    MemberKind::Group => {
                        if let Some(child) = by_id.get(m.value.as_str()) {
                            stack.push(child);
                        }
                    }
                }
            }
        }
        users
    }

    /// Evaluates an access rule: users named directly (id, or userName ignoring case) plus the
    /// users of every named group (id, or displayName ignoring case) through nested groups; the
    /// named groups with members limited to those users. Nested groups are flattened into the
    /// group that names them, not granted on their own. Entries that match nothing are listed
    /// in `unknown_groups` / `unknown_users`. Inactive users are included; what `active = false`
    /// means for the app is the reconciler's decision.
    pub fn granted(&self, rule: &AccessRule) -> Granted {
        let group_by_id: HashMap<&str, &DirGroup> =
            self.groups.iter().map(|g| (g.id.as_str(), g)).collect();
        let user_by_id: HashMap<&str, &DirUser> =
            self.users.iter().map(|u| (u.id.as_str(), u)).collect();

        let mut unknown_groups = Vec::new();
        let mut groups: BTreeMap<&str, &DirGroup> = BTreeMap::new();
        for entry in &rule.groups {
            let found = group_by_id.get(entry.as_str()).copied().or_else(|| {
                let lower = entry.to_lowercase();
                self.groups
                    .iter()
                    .find(|g| g.display_name.to_lowercase() == lower)
            });
            match found {
                Some(g) => {
                    groups.insert(&g.id, g);
                }
                None => unknown_groups.push(entry.clone()),
            }
        }

        let mut unknown_users = Vec::new();
        let mut user_ids: BTreeSet<&str> = BTreeSet::new();
        for entry in &rule.users {
            let found = user_by_id.get(entry.as_str()).copied().or_else(|| {
                let lower = entry.to_lowercase();
                self.users
                    .iter()
                    .find(|u| u.user_name.to_lowercase() == lower)
            });
            match found {
                Some(u) => {
                    user_ids.insert(&u.id);
                }
                None => unknown_users.push(entry.clone()),
            }
        }

        let flattened: Vec<(&DirGroup, BTreeSet<&str>)> = groups
            .values()
            .map(|g| (*g, self.flattened_users(g, &group_by_id)))
            .collect();
        for (_, members) in &flattened {
            // Validation guarantees member ids exist; the filter keeps an unvalidated value safe.
            user_ids.extend(members.iter().filter(|id| user_by_id.contains_key(*id)));
        }

        Granted {
            users: user_ids
                .iter()
                .filter_map(|id| user_by_id.get(id).map(|u| (*u).clone()))
                .collect(),
            groups: flattened
                .into_iter()
                .map(|(g, members)| GrantedGroup {
                    id: g.id.clone(),
                    display_name: g.display_name.clone(),
                    member_user_ids: members
                        .into_iter()
                        .filter(|id| user_ids.contains(id))
                        .map(str::to_string)
                        .collect(),
                })
                .collect(),
            unknown_groups,
            unknown_users,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn p() -> PathBuf {
        PathBuf::from("/srv/hub/directory.json")
    }

    fn user(id: &str, name: &str) -> serde_json::Value {
        serde_json::json!({"id": id, "userName": name})
    }

    fn group(id: &str, name: &str, members: &[(&str, &str)]) -> serde_json::Value {
        let members: Vec<_> = members
            .iter()
            .map(|(v, t)| serde_json::json!({"value": v, "type": t}))
            .collect();
        serde_json::json!({"id": id, "displayName": name, "members": members})
    }

    fn dir(
        users: Vec<serde_json::Value>,
        groups: Vec<serde_json::Value>,
    ) -> Result<Directory, ConfigError> {
        Directory::parse(
            &serde_json::json!({"users": users, "groups": groups}).to_string(),
            &p(),
        )
    }

    fn err(users: Vec<serde_json::Value>, groups: Vec<serde_json::Value>) -> String {
        let m = dir(users, groups).unwrap_err().to_string();
        assert!(!m.contains('\n'), "{m}");
        assert!(m.starts_with("/srv/hub/directory.json: "), "{m}");
        m
    }

    fn rule(groups: &[&str], users: &[&str]) -> AccessRule {
        AccessRule {
            groups: groups.iter().map(|s| s.to_string()).collect(),
            users: users.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parses_scim_shaped_json_with_defaults() {
        let text = r#"{"users": [{"id": "u1", "userName": "alice", "displayName": "Alice",
            "name": {"givenName": "Alice", "familyName": "L", "formatted": "Alice L"},
            "emails": [{"value": "a@x", "type": "work", "primary": true}, {"value": "b@x"}], "active": false},
            {"id": "u2", "userName": "bob"}],
            "groups": [{"id": "g1", "displayName": "Eng", "members": [{"value": "u1", "type": "User"}, {"value": "u2"}]}]}"#;
        let d = Directory::parse(text, &p()).unwrap();
        let a = &d.users[0];
        assert_eq!(
            (
                a.id.as_str(),
                a.user_name.as_str(),
                a.display_name.as_deref(),
                a.active
            ),
            ("u1", "alice", Some("Alice"), false)
        );
        assert_eq!(a.name.as_ref().unwrap().family_name.as_deref(), Some("L"));
        assert_eq!(
            a.emails[0],
            Email {
                value: "a@x".into(),
                kind: Some("work".into()),
                primary: true
            }
        );
        assert_eq!(
            a.emails[1],
            Email {
                value: "b@x".into(),
                kind: None,
                primary: false
            }
        );
        assert!(d.users[1].active);
        assert_eq!(d.groups[0].members[1].kind, MemberKind::User);
        assert_eq!(Directory::parse("{}", &p()).unwrap(), Directory::default());
    }

    #[test]
    fn json_errors_name_line_and_column() {
        let m = Directory::parse(
            "{\n \"users\": [\n  {\"id\": \"u1\", \"userNmae\": \"a\"}\n ]\n}",
            &p(),
        )
        .unwrap_err()
        .to_string();
        assert!(m.starts_with("/srv/hub/directory.json:3: column "), "{m}");
        assert!(m.contains("unknown field `userNmae`"), "{m}");
        assert!(!m.contains("at line"), "{m}");
        let m = Directory::parse("{\"users\": [", &p())
            .unwrap_err()
            .to_string();
        assert!(m.starts_with("/srv/hub/directory.json:1: column"), "{m}");
        let m = Directory::parse(r#"{"users": [{"id": "u1"}]}"#, &p())
            .unwrap_err()
            .to_string();
        assert!(m.contains("missing field `userName`"), "{m}");
    }

    #[test]
    fn validation_errors() {
        let m = err(vec![user("u1", "a"), user("u1", "b")], vec![]);
        assert!(
            m.contains(
                "`users[1].id` = \"u1\": users[0] has the same id; give every user its own id"
            ),
            "{m}"
        );
        let m = err(vec![user("u1", "Alice"), user("u2", "alice")], vec![]);
        assert!(
            m.contains("`users[1].userName` = \"alice\": users[0] has the same userName"),
            "{m}"
        );
        let m = err(vec![user(" ", "a")], vec![]);
        assert!(m.contains("`users[0].id` = \" \": the id is empty"), "{m}");
        let m = err(vec![user("u1", "")], vec![]);
        assert!(
            m.contains("`users[0].userName` = \"\": the userName is empty"),
            "{m}"
        );
        let m = err(vec![], vec![group("g1", "A", &[]), group("g1", "B", &[])]);
        assert!(
            m.contains("`groups[1].id` = \"g1\": groups[0] has the same id"),
            "{m}"
        );
        let m = err(
            vec![],
            vec![group("g1", "Eng", &[]), group("g2", "ENG", &[])],
        );
        assert!(
            m.contains("`groups[1].displayName` = \"ENG\": groups[0] has the same displayName"),
            "{m}"
        );
        let m = err(vec![], vec![group("g1", "", &[])]);
        assert!(m.contains("the displayName is empty"), "{m}");
        let m = err(
            vec![user("u1", "a")],
            vec![group("g1", "Eng", &[("u1", "User"), ("u9", "User")])],
        );
        assert!(m.contains("`groups[0].members[1].value` = \"u9\": group \"g1\" has a member of type User that is not a user id in this file; add the user or remove the member"), "{m}");
        let m = err(
            vec![user("u1", "a")],
            vec![
                group("g1", "Eng", &[("g2", "User")]),
                group("g2", "Ops", &[]),
            ],
        );
        assert!(
            m.contains("it is a group id: set \"type\": \"Group\""),
            "{m}"
        );
        let m = err(
            vec![user("u1", "a")],
            vec![group("g1", "Eng", &[("u1", "Group")])],
        );
        assert!(
            m.contains("type Group that is not a group id") && m.contains("set \"type\": \"User\""),
            "{m}"
        );
    }

    fn sample() -> Directory {
        dir(
            vec![
                user("u3", "carol"),
                user("u1", "alice"),
                user("u2", "bob"),
                user("u4", "dave"),
                user("u5", "eve"),
            ],
            vec![
                group(
                    "g-eng",
                    "Engineering",
                    &[("u1", "User"), ("g-plat", "Group")],
                ),
                group("g-plat", "Platform", &[("u2", "User"), ("g-sre", "Group")]),
                group("g-sre", "SRE", &[("u3", "User")]),
                group("g-sales", "Sales", &[("u4", "User")]),
            ],
        )
        .unwrap()
    }

    fn ids(g: &Granted) -> Vec<&str> {
        g.users.iter().map(|u| u.id.as_str()).collect()
    }

    #[test]
    fn granted_flattens_nested_groups() {
        let d = sample();
        let g = d.granted(&rule(&["engineering"], &[]));
        assert_eq!(ids(&g), ["u1", "u2", "u3"]);
        assert_eq!(g.groups.len(), 1);
        assert_eq!(g.groups[0].id, "g-eng");
        assert_eq!(g.groups[0].display_name, "Engineering");
        assert_eq!(g.groups[0].member_user_ids, ["u1", "u2", "u3"]);
        assert!(g.unknown_groups.is_empty() && g.unknown_users.is_empty());
    }

    #[test]
    fn granted_users_directly_by_id_or_username() {
        let d = sample();
        let g = d.granted(&rule(&["g-sre", "Sales"], &["EVE", "u1", "u1", "nobody"]));
        assert_eq!(ids(&g), ["u1", "u3", "u4", "u5"]);
        assert_eq!(
            g.groups.iter().map(|x| x.id.as_str()).collect::<Vec<_>>(),
            ["g-sales", "g-sre"]
        );
        assert_eq!(g.groups[1].member_user_ids, ["u3"]);
        assert_eq!(g.unknown_users, ["nobody"]);
        let g = d.granted(&rule(&["Nope"], &[]));
        assert!(g.users.is_empty() && g.groups.is_empty());
        assert_eq!(g.unknown_groups, ["Nope"]);
        assert_eq!(d.granted(&AccessRule::default()), Granted::default());
    }

    #[test]
    fn cycles_terminate_as_a_union() {
        let d = dir(
            vec![user("u1", "a"), user("u2", "b"), user("u3", "c")],
            vec![
                group("g1", "One", &[("u1", "User"), ("g2", "Group")]),
                group("g2", "Two", &[("u2", "User"), ("g3", "Group")]),
                group(
                    "g3",
                    "Three",
                    &[("u3", "User"), ("g1", "Group"), ("g3", "Group")],
                ),
            ],
        )
        .unwrap();
        for start in ["One", "Two", "g3"] {
            let g = d.granted(&rule(&[start], &[]));
            assert_eq!(ids(&g), ["u1", "u2", "u3"], "{start}");
            assert_eq!(g.groups[0].member_user_ids, ["u1", "u2", "u3"]);
        }
    }

    #[test]
    fn save_round_trips_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("directory.json");
        let d = sample();
        d.save(&path).unwrap();
        assert_eq!(Directory::load(&path).unwrap(), d);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains("\"userName\": \"alice\"") && text.contains("\"type\": \"Group\""),
            "{text}"
        );
        assert!(
            !text.contains("\"active\""),
            "defaults are not written: {text}"
        );
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    }

    #[test]
    fn sample_directory_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/directory.json");
        let d = Directory::load(&path).unwrap();
        let hub = super::super::hub::HubConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/hub.toml"),
        )
        .unwrap();
        let g = d.granted(&hub.apps[0].grant);
        assert_eq!(ids(&g), ["u-1001", "u-1002", "u-1003"]);
        assert!(g.unknown_groups.is_empty() && g.unknown_users.is_empty());
    }
}
